"""Access control on the real stack: API keys on every RPC, revoked keys, per-tenant quotas."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from services.client import TokenlineClient
from services.ingress.api_keys import ApiKeyStore
from services.proto.tokenline.v1 import generation_pb2 as pb
from tests.serving_stack import Stack
from tests.stack_probes import request, token_ids


def rpcs(client: TokenlineClient) -> dict[str, Callable[[], object]]:
    return {
        "Generate": lambda: client.generate(request("1+2=", max_tokens=2)),
        "GenerateStream": lambda: token_ids(client.stream(request("1+2=", max_tokens=2))),
        "Tokenize": lambda: client.tokenize(pb.TokenizeRequest(text="1+2=")),
        "Cancel": lambda: client.cancel("nobody"),
        "ListModels": lambda: client.list_models(),
        "Resume": lambda: token_ids(client.resume("nobody", 0)),
    }


@pytest.mark.parametrize("key", [None, "tl_not-a-real-key", "garbage"])
def test_missing_or_wrong_key_is_unauthenticated_on_every_rpc(stack: Stack, key: str | None) -> None:
    with TokenlineClient(stack.target, key) as client:
        for name, call in rpcs(client).items():
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, name


def test_model_the_tenant_may_not_use_is_permission_denied(stack: Stack) -> None:
    with ApiKeyStore(stack.config.redis_url, stack.config.queue.key_prefix) as keys:
        key, _ = keys.create("elsewhere", models=("another-model",))
    with TokenlineClient(stack.target, key) as client:
        for name, call in rpcs(client).items():
            if name in ("ListModels", "Resume"):
                continue  # ListModels lists what the tenant may use; Resume of an unknown id is NOT_FOUND
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
        assert client.list_models() == []


def test_revoked_key_stops_working(stack: Stack) -> None:
    with ApiKeyStore(stack.config.redis_url, stack.config.queue.key_prefix) as keys:
        key, record = keys.create("short-lived")
        with TokenlineClient(stack.target, key) as client:
            assert client.list_models()
            assert keys.revoke(record.key_id)
            time.sleep(stack.config.auth.cache_ttl_s + 0.5)
            with pytest.raises(grpc.RpcError) as caught:
                client.list_models()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tenant_over_quota_is_refused_while_others_succeed(stack: Stack) -> None:
    with ApiKeyStore(stack.config.redis_url, stack.config.queue.key_prefix) as keys:
        greedy_key, _ = keys.create("greedy", rpm=3)
    codes = []
    with (
        TokenlineClient(stack.target, greedy_key) as greedy,
        TokenlineClient(stack.target, stack.api_key) as fair,
    ):
        for _ in range(6):
            try:
                greedy.generate(request("1+2=", max_tokens=2))
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
                assert "retry-after-ms=" in (error.details() or "")
            assert fair.generate(request("1+2=", max_tokens=2)).token_ids  # the other tenant: 100% success
    assert codes[:3] == [grpc.StatusCode.OK] * 3
    assert codes[3:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
