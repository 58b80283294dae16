"""The gRPC message limit (AppConfig.grpc_max_message_bytes) on the real stack.

With grpc_ingress 'replica' (the default) the ingress replicas' own gRPC servers take the
limit from the config. Ray Serve's gRPC proxy (other modes) takes it from
RAY_SERVE_GRPC_MAX_MESSAGE_SIZE in its own environment; services/server.py places the
configured value there before ray.init. A request one byte over the limit is refused by gRPC
itself (RESOURCE_EXHAUSTED); one at the limit reaches tokenline, which refuses a prompt that
long by naming the prompt field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import psutil
import pytest
from google.protobuf.message import Message

from services.client import TokenlineClient
from services.proto.tokenline.v1 import generation_pb2 as pb
from services.server import RAY_GRPC_MAX_MESSAGE_ENV
from tests.raw_grpc import assert_invalid_argument, call_typed, error_of
from tests.serving_stack import Stack

BUILDERS: dict[str, Callable[[int], Message]] = {
    "text": lambda n: pb.GenerateRequest(text="7 " * (n // 2) + "7" * (n % 2)),
    "chat": lambda n: pb.GenerateRequest(
        chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="7" * n)])
    ),
    "token_ids": lambda n: pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * n)),  # one byte per id
    "tokenize": lambda n: pb.TokenizeRequest(text="7 " * (n // 2) + "7" * (n % 2)),
}
RPC_OF = {"text": "Generate", "chat": "GenerateStream", "token_ids": "Generate", "tokenize": "Tokenize"}


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[TokenlineClient]:
    with TokenlineClient(stack.target, stack.api_key) as c:
        yield c


def of_size(build: Callable[[int], Message], size: int) -> Message:
    """The message ``build(n)`` whose serialized size is exactly ``size`` bytes."""
    n = size - build(0).ByteSize()
    for _ in range(8):
        message = build(n)
        if message.ByteSize() == size:
            return message
        n += size - message.ByteSize()
    raise AssertionError(f"no message of exactly {size} bytes")


def test_the_proxy_runs_with_the_configured_limit(stack: Stack) -> None:
    """The variable reached the proxy process (a child of the raylet, not of this process)."""
    if stack.config.grpc_ingress == "replica":
        pytest.skip("grpc_ingress 'replica' runs no proxy; the size tests below check the ingress's limit")
    proxies = [
        p for p in psutil.process_iter(["cmdline"]) if "ProxyActor" in " ".join(p.info["cmdline"] or ())
    ]
    assert proxies, "no Ray Serve proxy process found"
    for proxy in proxies:
        assert proxy.environ().get(RAY_GRPC_MAX_MESSAGE_ENV) == str(stack.config.grpc_max_message_bytes)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_request_one_byte_over_the_limit_is_resource_exhausted(
    stack: Stack, client: TokenlineClient, kind: str
) -> None:
    message = of_size(BUILDERS[kind], stack.config.grpc_max_message_bytes + 1)
    error = error_of(lambda: call_typed(client, RPC_OF[kind], message))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"{error.code()}: {error.details()}"
    assert "larger than max" in (error.details() or "")


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_request_at_the_limit_with_a_too_long_prompt_names_the_prompt(
    stack: Stack, client: TokenlineClient, kind: str
) -> None:
    """Exactly at the limit the message passes gRPC, and the prompt, far longer than the
    model's context, is refused by tokenline with the field named, not by a crash."""
    message = of_size(BUILDERS[kind], stack.config.grpc_max_message_bytes)
    assert_invalid_argument(error_of(lambda: call_typed(client, RPC_OF[kind], message)), "prompt")


def status_of_call(client: TokenlineClient, kind: str, size: int) -> grpc.StatusCode:
    message = of_size(BUILDERS[kind], size)
    code: grpc.StatusCode = error_of(lambda: call_typed(client, RPC_OF[kind], message)).code()
    return code


def test_the_stack_serves_after_oversized_requests(stack: Stack, client: TokenlineClient) -> None:
    over = stack.config.grpc_max_message_bytes + 1
    codes = {kind: status_of_call(client, kind, over) for kind in sorted(BUILDERS)}
    assert set(codes.values()) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    sampling = pb.SamplingParams(max_tokens=8, temperature=0.0)
    assert "47" in client.generate(pb.GenerateRequest(text="12+35=", sampling=sampling)).text
    assert [m.name for m in client.list_models()] == [stack.config.default_model_name]
