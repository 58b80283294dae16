"""End to end: gRPC client -> Ray Serve gRPC proxy -> ingress -> tokenizer -> Redis queue ->
engine replicas -> detokenizer -> client. Real Ray, real Redis, real gRPC over loopback,
the real demo model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from services.client import TokenlineClient
from services.engine import EngineConfig, SamplingParams
from services.engine.engine import Engine
from services.proto.tokenline.v1 import generation_pb2 as pb
from tests.serving_stack import MODEL_NAME, Stack
from tests.stack_probes import wait_until

QUESTIONS = [
    f"{a}+{b}=" for a, b in [(12, 35), (40, 7), (3, 3), (25, 61), (9, 80), (33, 44), (1, 2), (70, 19)]
]


@pytest.fixture
def client(stack: Stack) -> Iterator[TokenlineClient]:
    with TokenlineClient(stack.target, stack.api_key) as c:
        yield c


def request(
    prompt: str,
    *,
    max_tokens: int = 24,
    seed: int | None = None,
    temperature: float = 0.0,
    request_id: str = "",
    stop: tuple[str, ...] = (),
    ignore_eos: bool = False,
) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, stop=list(stop), ignore_eos=ignore_eos
    )
    if seed is not None:
        sampling.seed = seed
    return pb.GenerateRequest(request_id=request_id, text=prompt, sampling=sampling)


def collect(
    messages: Iterator[pb.GenerateStreamResponse], start: int = 0
) -> tuple[str, list[int], pb.GenerateStreamResponse]:
    """Concatenate a stream from token ``start``, checking that token indices are contiguous:
    no gap, no duplicate."""
    text: list[str] = []
    ids: list[int] = []
    last = pb.GenerateStreamResponse()
    for message in messages:
        assert message.token_index == start + len(ids), "a gap or a duplicate in the token stream"
        text.append(message.text)
        ids.extend(message.token_ids)
        last = message
    return "".join(text), ids, last


def test_unary_generate_answers_the_demo_task(client: TokenlineClient) -> None:
    response = client.generate(request("12+35="))
    assert response.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert response.usage.completion_tokens == len(response.token_ids) > 0
    assert response.usage.prompt_tokens > 0
    assert "47" in response.text


def test_stream_equals_unary(client: TokenlineClient) -> None:
    unary = client.generate(request("40+7=", seed=5))
    text, ids, last = collect(client.stream(request("40+7=", seed=5)))
    assert text == unary.text
    assert ids == list(unary.token_ids)
    assert last.finish_reason == unary.finish_reason
    assert last.usage.completion_tokens == len(ids)


def test_seeded_output_equals_offline_engine(client: TokenlineClient, demo_model_dir: Path) -> None:
    prompt = "Count: 3 4 5"
    ids = list(client.tokenize(pb.TokenizeRequest(text=prompt)).token_ids)
    served = client.generate(request(prompt, seed=99, temperature=0.9, max_tokens=16, ignore_eos=True))
    offline = Engine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=64)).generate(
        [ids], SamplingParams(max_tokens=16, temperature=0.9, seed=99, ignore_eos=True)
    )[0]
    assert list(served.token_ids) == offline.token_ids


def test_thirty_two_concurrent_streams_complete(stack: Stack) -> None:
    def one(i: int) -> tuple[str, list[int], pb.GenerateStreamResponse]:
        with TokenlineClient(stack.target, stack.api_key) as c:
            return collect(c.stream(request(QUESTIONS[i % len(QUESTIONS)], seed=i)))

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(one, range(32)))
    for text, ids, last in results:
        assert last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        assert ids and text


def test_stop_string_ends_the_stream_without_leaking(client: TokenlineClient) -> None:
    full = client.generate(request("Count: 3 4 5", max_tokens=20, ignore_eos=True)).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"need a visible stop string from {full!r}"
    text, _, last = collect(
        client.stream(request("Count: 3 4 5", max_tokens=20, ignore_eos=True, stop=(stop,)))
    )
    assert text == full[: full.index(stop)]
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert last.matched_stop == stop


def test_chat_prompt_uses_the_template(client: TokenlineClient) -> None:
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="12+35=")])
    tokenized = client.tokenize(pb.TokenizeRequest(chat=chat))
    plain = client.tokenize(pb.TokenizeRequest(text="12+35="))
    assert tokenized.count > plain.count  # the template adds role markers
    response = client.generate(pb.GenerateRequest(chat=chat, sampling=pb.SamplingParams(max_tokens=16)))
    assert response.usage.prompt_tokens == tokenized.count
    assert response.token_ids


def test_list_models(client: TokenlineClient) -> None:
    models = client.list_models()
    assert [m.name for m in models] == [MODEL_NAME]
    assert models[0].is_default and models[0].max_context_length > 0


def test_cancel_frees_engine_capacity_within_a_second(stack: Stack, client: TokenlineClient) -> None:
    stream = client.stream(request("1+2=", max_tokens=2000, ignore_eos=True, request_id="cancel-me"))
    first = next(stream)
    assert any("cancel-me" in s.held_request_ids for s in stack.engine_statuses(2).values())
    assert client.cancel("cancel-me")
    started = time.monotonic()
    while any("cancel-me" in s.held_request_ids for s in stack.engine_statuses(2).values()):
        assert time.monotonic() - started < 1.0, "engine still runs the cancelled request"
        time.sleep(0.05)
    _, _, last = collect(stream, start=len(first.token_ids))
    assert last.finish_reason == pb.FINISH_REASON_ABORT


def test_two_engine_replicas_share_one_queue(stack: Stack) -> None:
    before = {pid: s.steps for pid, s in stack.engine_statuses(2).items()}
    assert len(before) == 2

    def one(i: int) -> None:
        with TokenlineClient(stack.target, stack.api_key) as c:
            collect(c.stream(request(QUESTIONS[i % len(QUESTIONS)], max_tokens=40, ignore_eos=True)))

    with ThreadPoolExecutor(max_workers=24) as pool:
        list(pool.map(one, range(24)))
    after = stack.engine_statuses(2)
    assert all(after[pid].steps > before[pid] for pid in before), "both replicas must have pulled work"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.sampling.__setattr__("temperature", -1.0), "sampling.temperature"),
        (lambda r: r.sampling.__setattr__("temperature", float("nan")), "sampling.temperature"),
        (lambda r: r.sampling.__setattr__("top_p", 0.0), "sampling.top_p"),
        (lambda r: r.sampling.__setattr__("top_k", -5), "sampling.top_k"),
        (lambda r: r.sampling.__setattr__("max_tokens", 0), "sampling.max_tokens"),
        (lambda r: r.__setattr__("request_id", "bad id with spaces"), "request_id"),
        (lambda r: r.__setattr__("text", ""), "prompt.text"),
        (lambda r: r.token_ids.ids.extend([1, 10**9]), "prompt.token_ids"),
        (lambda r: r.__setattr__("text", "7 " * 100_000), "prompt"),
    ],
)
def test_invalid_fields_get_invalid_argument_naming_the_field(client: TokenlineClient, mutate, field) -> None:  # type: ignore[no-untyped-def]
    bad = request("1+2=")
    mutate(bad)
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field)


def test_unknown_model_is_not_found(client: TokenlineClient) -> None:
    bad = request("1+2=")
    bad.model = "no-such-model"
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(bad)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_full_queue_gets_resource_exhausted(stack: Stack, client: TokenlineClient) -> None:
    """With max_queue_depth requests unfinished, each further one is refused with
    RESOURCE_EXHAUSTED and a retry hint; once they end, the queue admits again. The holders
    are long enough (2,000 tokens each) that none can finish while the extras are sent."""
    limit = stack.config.queue.max_queue_depth
    holders = {
        f"hold-{i}": client.stream(request("1+2=", max_tokens=2000, ignore_eos=True, request_id=f"hold-{i}"))
        for i in range(limit)
    }
    wait_until(lambda: stack.unfinished_in_queue()[1] == limit, 60, "the queue to fill")

    def refusal(i: int) -> tuple[grpc.StatusCode, str]:
        try:
            client.generate(request("1+2=", max_tokens=8, request_id=f"flood-{i}"))
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, ""

    with ThreadPoolExecutor(max_workers=8) as pool:
        refused = list(pool.map(refusal, range(16)))
    for request_id in holders:
        client.cancel(request_id)
    finishes = {collect(stream)[2].finish_reason for stream in holders.values()}

    assert {code for code, _ in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("retry-after-ms=" in details for _, details in refused)
    assert finishes == {pb.FINISH_REASON_ABORT}, "a holder finished before the extras were refused"
    wait_until(lambda: stack.unfinished_in_queue()[1] == 0, 30, "the cancelled holders to leave")
    after = client.generate(request("1+2=", max_tokens=8, ignore_eos=True))
    assert after.finish_reason == pb.FINISH_REASON_LENGTH
