"""A configured context limit (engine ``max_model_len``) below the model's own reaches the
ingress: a prompt that does not fit is refused with INVALID_ARGUMENT naming the prompt, not
accepted and then failed by the engine. Its own small stack (the shared one keeps the
model's context). Unlike the other test stacks, its engine runs at the default CPU priority,
and the last test checks that the priority reached the engine's loop."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.client import TokenlineClient
from services.config import EngineSettings
from services.proto.tokenline.v1 import generation_pb2 as pb
from tests.raw_grpc import assert_invalid_argument, error_of
from tests.serving_stack import Stack, stack_config, start_stack

OWN_STACK = True
MAX_MODEL_LEN = 64  # the demo model's own context is 2048


@pytest.fixture(scope="module")
def short_stack(demo_model_dir: Path) -> Iterator[Stack]:
    config = stack_config(str(demo_model_dir), engine_replicas=1)
    (model,) = config.models
    default_nice = EngineSettings.model_fields["nice"].default
    engine = EngineSettings(
        **{**model.engine.model_dump(), "max_model_len": MAX_MODEL_LEN, "nice": default_nice}
    )
    config = config.model_copy(update={"models": (model.model_copy(update={"engine": engine}),)})
    yield from start_stack(config)


@pytest.fixture(scope="module")
def client(short_stack: Stack) -> Iterator[TokenlineClient]:
    with TokenlineClient(short_stack.target, short_stack.api_key) as c:
        yield c


def ids_request(count: int, max_tokens: int | None = None) -> pb.GenerateRequest:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * count))
    request.sampling.temperature = 0.0
    request.sampling.ignore_eos = True
    if max_tokens is not None:
        request.sampling.max_tokens = max_tokens
    return request


def test_list_models_reports_the_configured_limit(client: TokenlineClient) -> None:
    (info,) = client.list_models()
    assert info.max_context_length == MAX_MODEL_LEN


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_prompt_over_the_configured_limit_is_invalid_argument(client: TokenlineClient, rpc: str) -> None:
    for request in (ids_request(MAX_MODEL_LEN, max_tokens=1), pb.GenerateRequest(text="7 " * 200)):
        if rpc == "Generate":
            error = error_of(lambda r=request: client.generate(r, timeout_s=30))
        else:
            error = error_of(lambda r=request: list(client.stream(r, timeout_s=30)))
        assert_invalid_argument(error, "prompt")


def test_prompt_one_short_of_the_limit_is_served_up_to_the_limit(client: TokenlineClient) -> None:
    """The other side of the boundary: 63 ids leave room for one token, and a request that
    asks for more ends at the context limit with LENGTH instead of failing."""
    response = client.generate(ids_request(MAX_MODEL_LEN - 1, max_tokens=50), timeout_s=60)
    assert response.usage.prompt_tokens == MAX_MODEL_LEN - 1
    assert len(response.token_ids) == 1
    assert response.finish_reason == pb.FINISH_REASON_LENGTH


def test_the_engine_loop_runs_at_the_configured_priority(short_stack: Stack) -> None:
    (model,) = short_stack.config.models
    assert model.engine.nice < 0, "the default raises the engine's priority"
    (status,) = short_stack.engine_statuses(1).values()
    if os.geteuid() == 0:  # root holds CAP_SYS_NICE, as do the chart's worker pods
        assert status.loop_nice == model.engine.nice
    else:  # refused: the loop keeps the priority it was started with (the replica logs why)
        assert status.loop_nice == os.getpriority(os.PRIO_PROCESS, 0)
