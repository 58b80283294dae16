"""The Redis Streams request queue against a real redis-server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from services.errors import InvalidParameterError, QueueFullError
from services.messages import FinishReason, GenerationRequest, SamplingParams, TokenChunk, Usage
from services.queue import (
    ClaimedRequest,
    EngineQueue,
    KvBudget,
    OutputCursor,
    QueueClient,
    QueueConfig,
    RedisServer,
    client_queue,
)
from services.queue.codec import decode_chunk, decode_request, encode_chunk, encode_request
from services.queue.keys import QueueKeys
from services.queue.output_stream import advance

MODEL = "demo"
KEYS = QueueKeys()
T = TypeVar("T")


def request(request_id: str, prompt: tuple[int, ...] = (1, 2, 3)) -> GenerationRequest:
    params = SamplingParams(temperature=0.0, max_tokens=8, seed=7, stop=("\n",))
    return GenerationRequest(request_id, MODEL, prompt, params, priority=1, arrival_time=12.5, tenant="t")


def with_client(url: str, config: QueueConfig, body: Callable[[QueueClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with QueueClient(url, config) as client:
            return await body(client)

    return asyncio.run(main())


def enqueue_all(url: str, config: QueueConfig, *requests: GenerationRequest) -> None:
    async def body(client: QueueClient) -> None:
        for item in requests:
            await client.enqueue(item)

    with_client(url, config, body)


def read_all(url: str, request_id: str, max_entries: int = 256) -> list[TokenChunk]:
    async def body(client: QueueClient) -> list[TokenChunk]:
        cursor, chunks = OutputCursor(request_id), []
        while not cursor.finished:
            batch, cursor = await client.read(cursor, block_ms=2000, max_entries=max_entries)
            chunks.extend(batch)
        return chunks

    return with_client(url, QueueConfig(), body)


def test_round_trip_enqueue_claim_append_read_finish(redis_url: str) -> None:
    config = QueueConfig()
    enqueue_all(redis_url, config, request("r1"))
    with EngineQueue(redis_url, config) as engine:
        (claimed,) = engine.claim(MODEL, "engine-a", max_count=4, block_ms=100)
        assert claimed.request == request("r1")
        assert (claimed.deliveries, claimed.cancelled) == (1, False)
        engine.append([TokenChunk("r1", 0, (10, 11), logprobs=(-0.5, -0.25))])
        usage = Usage(prompt_tokens=3, completion_tokens=3)
        engine.append([TokenChunk("r1", 2, (12,), finish_reason=FinishReason.LENGTH, usage=usage)])
        assert engine.finish(MODEL, claimed.entry_id, "r1") is True
    chunks = read_all(redis_url, "r1")
    assert [c.token_ids for c in chunks] == [(10, 11), (12,)]
    assert chunks[0].logprobs == (-0.5, -0.25)
    assert (chunks[-1].finish_reason, chunks[-1].usage) == (FinishReason.LENGTH, usage)
    assert with_client(redis_url, config, lambda client: client.depth(MODEL)) == 0
    with redis.Redis.from_url(redis_url) as raw:
        assert raw.xlen(KEYS.for_model(MODEL).band(1)) == 0, "a finished request leaves the stream"


def test_claim_takes_only_as_many_as_asked(redis_url: str) -> None:
    config = QueueConfig()
    enqueue_all(redis_url, config, request("a"), request("b"), request("c"))
    with EngineQueue(redis_url, config) as engine:
        assert [c.request.request_id for c in engine.claim(MODEL, "e", 2, 0)] == ["a", "b"]
        assert [c.request.request_id for c in engine.claim(MODEL, "e", 0, 0)] == []
        assert [c.request.request_id for c in engine.claim(MODEL, "e", 5, 0)] == ["c"]
        assert engine.claim(MODEL, "e", 5, 0) == []


def test_same_request_id_twice_is_one_request(redis_url: str) -> None:
    config = QueueConfig()

    async def body(client: QueueClient) -> tuple[bool, bool, str, str, int, bool]:
        first = await client.enqueue(request("dup"))
        second = await client.enqueue(request("dup"))
        return (
            first.duplicate, second.duplicate, first.entry_id, second.entry_id,
            await client.depth(MODEL), await client.exists("dup"),
        )  # fmt: skip

    first_dup, second_dup, first_id, second_id, depth, known = with_client(redis_url, config, body)
    assert (first_dup, second_dup, depth, known) == (False, True, 1, True)
    assert first_id == second_id
    with EngineQueue(redis_url, config) as engine:
        assert len(engine.claim(MODEL, "e", 10, 0)) == 1


def test_admission_bound_refuses_with_retry_hint_and_finish_frees_one_slot(redis_url: str) -> None:
    config = QueueConfig(max_queue_depth=2, retry_after_s=2.5)
    enqueue_all(redis_url, config, request("a"), request("b"))
    with pytest.raises(QueueFullError) as refused:
        enqueue_all(redis_url, config, request("c"))
    assert (refused.value.depth, refused.value.limit, refused.value.retry_after_s) == (2, 2, 2.5)
    with EngineQueue(redis_url, config) as engine:
        first = engine.claim(MODEL, "e", 1, 0)[0]
        assert engine.finish(MODEL, first.entry_id, "a") is True
        assert engine.finish(MODEL, first.entry_id, "a") is False, "a second finish must not free a slot"
    with_client(redis_url, config, lambda client: client.ensure_room(MODEL))  # one slot is free again
    enqueue_all(redis_url, config, request("c"))
    with pytest.raises(QueueFullError):
        enqueue_all(redis_url, config, request("d"))
    with pytest.raises(QueueFullError):
        with_client(redis_url, config, lambda client: client.ensure_room(MODEL))


def test_expired_lease_is_reclaimed_with_the_tokens_already_written(redis_url: str) -> None:
    config = QueueConfig(lease_s=0.3)
    enqueue_all(redis_url, config, request("r"))
    with EngineQueue(redis_url, config) as engine:
        (held,) = engine.claim(MODEL, "engine-a", 1, 0)
        engine.append([TokenChunk("r", 0, (4, 5, 6))])
        assert engine.reclaim_expired(MODEL, "engine-b", 4) == [], "the lease has not run out yet"
        time.sleep(0.4)
        (taken,) = engine.reclaim_expired(MODEL, "engine-b", 4)
        assert (taken.entry_id, taken.request, taken.deliveries) == (held.entry_id, request("r"), 2)
        assert engine.read_output_tokens("r") == ([4, 5, 6], False)
        assert engine.renew(MODEL, "engine-a", [held.entry_id]) == {held.entry_id}, "engine-a lost it"
        assert engine.renew(MODEL, "engine-b", [held.entry_id]) == set()


def test_handed_back_request_is_reclaimable_at_once_without_counting_a_delivery(redis_url: str) -> None:
    config = QueueConfig(lease_s=60.0, max_deliveries=1)
    enqueue_all(redis_url, config, request("r"), request("kept"))
    with EngineQueue(redis_url, config) as engine:
        held = {c.request.request_id: c for c in engine.claim(MODEL, "stopping", 2, 0)}
        assert held["r"].reclaimed is False
        assert engine.hand_back(MODEL, "other", [held["r"].entry_id]) == 0, "only the holder hands back"
        assert engine.hand_back(MODEL, "stopping", [held["r"].entry_id]) == 1
        (taken,) = engine.reclaim_expired(MODEL, "successor", 4)  # long before the 60 s lease ran out
        assert (taken.request.request_id, taken.deliveries, taken.reclaimed) == ("r", 1, True)
        assert engine.renew(MODEL, "stopping", [held["kept"].entry_id]) == set(), "the rest stays held"


def test_expired_request_behind_many_live_ones_is_found(redis_url: str) -> None:
    config = QueueConfig(lease_s=0.3, max_queue_depth=64)
    enqueue_all(redis_url, config, *(request(f"r{i:02}") for i in range(40)))
    with EngineQueue(redis_url, config) as engine:
        held = engine.claim(MODEL, "engine-a", 40, 0)
        time.sleep(0.35)
        assert engine.renew(MODEL, "engine-a", [c.entry_id for c in held[:-1]]) == set()
        (taken,) = engine.reclaim_expired(MODEL, "engine-b", 1)
        assert taken.request.request_id == "r39"


def test_renewed_lease_is_not_reclaimed(redis_url: str) -> None:
    config = QueueConfig(lease_s=0.6)
    enqueue_all(redis_url, config, request("r"))
    with EngineQueue(redis_url, config) as engine:
        (held,) = engine.claim(MODEL, "engine-a", 1, 0)
        for _ in range(3):
            time.sleep(0.3)
            assert engine.renew(MODEL, "engine-a", [held.entry_id]) == set()
        assert engine.reclaim_expired(MODEL, "engine-b", 4) == []


def test_engine_calls_on_a_model_nobody_enqueued_to_yet(redis_url: str) -> None:
    with EngineQueue(redis_url) as engine:
        assert engine.reclaim_expired("fresh", "e", 4) == []
        assert engine.renew("fresh", "e", ["1-0"]) == {"1-0"}
        assert engine.claim("fresh", "e", 4, block_ms=10) == []
        assert engine.finish("fresh", "1-0", "unknown") is False


def test_request_delivered_too_often_is_dead_lettered_with_an_error_chunk(redis_url: str) -> None:
    config = QueueConfig(lease_s=0.1, max_deliveries=2)
    enqueue_all(redis_url, config, request("poison"))
    with EngineQueue(redis_url, config) as engine:
        assert len(engine.claim(MODEL, "a", 1, 0)) == 1
        time.sleep(0.15)
        assert [c.deliveries for c in engine.reclaim_expired(MODEL, "b", 1)] == [2]
        time.sleep(0.15)
        assert engine.reclaim_expired(MODEL, "c", 1) == [], "a third delivery exceeds max_deliveries"
        time.sleep(0.15)
        assert engine.reclaim_expired(MODEL, "d", 1) == [], "never handed out again"
    final = read_all(redis_url, "poison")[-1]
    assert final.finish_reason is FinishReason.ERROR
    assert "delivered 3 times" in final.error
    with redis.Redis.from_url(redis_url) as raw:
        (dead,) = raw.xrange(KEYS.for_model(MODEL).dead)
        assert dead[1][b"id"] == b"poison" and dead[1][b"deliveries"] == b"3"
    assert with_client(redis_url, config, lambda client: client.depth(MODEL)) == 0


def test_unreadable_entry_is_dead_lettered_not_handed_out(redis_url: str) -> None:
    config = QueueConfig()
    enqueue_all(redis_url, config, request("good"))
    with redis.Redis.from_url(redis_url) as raw:
        raw.xadd(KEYS.for_model(MODEL).band(1), {"v": "99", "id": "future"})  # behind "good"
    with EngineQueue(redis_url, config) as engine:
        assert [c.request.request_id for c in engine.claim(MODEL, "e", 10, 0)] == ["good"]
    with redis.Redis.from_url(redis_url) as raw:
        (dead,) = raw.xrange(KEYS.for_model(MODEL).dead)
        assert b"codec version" in dead[1][b"reason"]


def test_cancel_reaches_the_engine_holding_the_request(redis_url: str) -> None:
    config = QueueConfig()
    enqueue_all(redis_url, config, request("keep"), request("stop"))
    with EngineQueue(redis_url, config) as engine:
        held = engine.claim(MODEL, "e", 2, 0)
        assert with_client(redis_url, config, lambda client: client.cancel(MODEL, "stop")) is True
        step = [TokenChunk("keep", 0, (1,)), TokenChunk("stop", 0, (2,))]
        reply = engine.append_and_poll_cancels(MODEL, step, ["keep", "stop"])
        assert reply.cancelled == {"stop"}
        assert engine.cancelled(MODEL, ["keep", "stop"]) == {"stop"}
        engine.append([TokenChunk("stop", 1, (), finish_reason=FinishReason.ABORT)])
        engine.finish(MODEL, held[1].entry_id, "stop")
        assert engine.cancelled(MODEL, ["stop"]) == set(), "finishing clears the cancel mark"
    assert with_client(redis_url, config, lambda client: client.cancel(MODEL, "stop")) is False
    assert read_all(redis_url, "stop")[-1].finish_reason is FinishReason.ABORT


def _script_command_calls(client: redis.Redis) -> int:
    """SCRIPT commands Redis has run (redis-py files SCRIPT EXISTS, LOAD, ... under one key)."""
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_script", {}).get("calls", 0))


def test_the_step_write_that_finishes_requests_is_one_round_trip_and_survives_a_script_flush(
    redis_url: str,
) -> None:
    """The step's write releases finished requests with the FINISH script in its own pipeline,
    without asking Redis first whether the script exists; a Redis that lost its scripts (a
    restart) gets them again and the release is sent again, the tokens only once."""
    config = QueueConfig()
    enqueue_all(redis_url, config, request("one"), request("two"))
    with EngineQueue(redis_url, config) as engine, redis.Redis.from_url(redis_url) as raw:
        first, second = engine.claim(MODEL, "e", 2, 0)
        engine.finish(MODEL, "0-0", "nobody")  # loads FINISH, as a replica's first release would
        asked_before = _script_command_calls(raw)
        final = TokenChunk("one", 0, (5,), finish_reason=FinishReason.LENGTH)
        engine.append_and_poll_cancels(MODEL, [final], ["two"], {"one": first.entry_id})
        assert _script_command_calls(raw) == asked_before, "no SCRIPT EXISTS round trip"
        assert with_client(redis_url, config, lambda client: client.depth(MODEL)) == 1
        raw.script_flush()
        final = TokenChunk("two", 0, (6,), finish_reason=FinishReason.LENGTH)
        engine.append_and_poll_cancels(MODEL, [final], [], {"two": second.entry_id})
        assert with_client(redis_url, config, lambda client: client.depth(MODEL)) == 0
        assert raw.xlen(KEYS.output("two")) == 1, "only the release is sent again, not the tokens"


def _command_calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_cancel_of_a_queued_request_is_seen_at_claim_in_the_same_round_trip(redis_url: str) -> None:
    """The claim script says which claimed requests a client cancelled (no second command); a
    reclaim, whose script does not look, still sees a cancel made while the lease ran out."""
    config = QueueConfig(lease_s=0.3)
    enqueue_all(redis_url, config, request("queued"), request("kept"))
    assert with_client(redis_url, config, lambda client: client.cancel(MODEL, "queued")) is True
    with EngineQueue(redis_url, config) as engine, redis.Redis.from_url(redis_url) as raw:
        asked = _command_calls(raw, "smismember"), _command_calls(raw, "sismember")
        claimed = {c.request.request_id: c.cancelled for c in engine.claim(MODEL, "e", 2, 0)}
        assert claimed == {"queued": True, "kept": False}
        assert _command_calls(raw, "smismember") == asked[0], "the flags came with the claim"
        assert _command_calls(raw, "sismember") == asked[1] + 2, "looked up inside the claim script"
        assert with_client(redis_url, config, lambda client: client.cancel(MODEL, "kept")) is True
        time.sleep(0.4)
        reclaimed = {c.request.request_id: c.cancelled for c in engine.reclaim_expired(MODEL, "f", 2)}
        assert reclaimed == {"queued": True, "kept": True}


def test_reader_never_sees_an_index_twice_when_two_writers_overlap(redis_url: str) -> None:
    expected = list(range(100, 110))
    with EngineQueue(redis_url, QueueConfig()) as engine:
        # engine-a stalls after 5 tokens; engine-b resumes from the 3 it saw; a wakes up.
        engine.append([TokenChunk("r", 0, tuple(expected[0:3]))])
        engine.append([TokenChunk("r", 3, tuple(expected[3:5]))])
        engine.append([TokenChunk("r", 3, tuple(expected[3:7]))])
        engine.append([TokenChunk("r", 5, tuple(expected[5:8]))])
        engine.append([TokenChunk("r", 7, tuple(expected[7:10]), finish_reason=FinishReason.STOP)])
        engine.append([TokenChunk("r", 8, tuple(expected[8:10]), finish_reason=FinishReason.STOP)])
        assert engine.read_output_tokens("r") == (expected, True)
    for max_entries in (1, 2, 256):
        chunks = read_all(redis_url, "r", max_entries)
        indices = [chunk.start_index + offset for chunk in chunks for offset in range(len(chunk.token_ids))]
        assert indices == list(range(10))
        assert [token for chunk in chunks for token in chunk.token_ids] == expected


def test_blocked_read_wakes_when_the_engine_writes(redis_url: str) -> None:
    async def body(client: QueueClient) -> tuple[list[TokenChunk], float]:
        def write_later() -> None:
            time.sleep(0.2)
            with EngineQueue(redis_url) as engine:
                engine.append([TokenChunk("r", 0, (42,))])

        started = time.monotonic()
        (chunks, _), _ = await asyncio.gather(
            client.read(OutputCursor("r"), 5000), asyncio.to_thread(write_later)
        )
        return chunks, time.monotonic() - started

    chunks, waited = with_client(redis_url, QueueConfig(), body)
    assert [c.token_ids for c in chunks] == [(42,)]
    assert 0.15 < waited < 4.0


def test_redis_sigkill_and_restart_loses_no_accepted_request() -> None:
    config = QueueConfig(lease_s=0.2)
    accepted = [request(f"r{i}") for i in range(20)]
    with RedisServer(appendfsync="always") as server:
        enqueue_all(server.url, config, *accepted)
        with EngineQueue(server.url, config) as engine:
            running = engine.claim(MODEL, "engine-a", 5, 0)
        server.kill()
        server.restart()
        time.sleep(0.3)
        with EngineQueue(server.url, config) as engine:
            fresh = engine.claim(MODEL, "engine-b", 100, 0)
            reclaimed = engine.reclaim_expired(MODEL, "engine-b", 100)
        assert {c.entry_id for c in reclaimed} == {c.entry_id for c in running}
        recovered = sorted(c.request.request_id for c in fresh + reclaimed)
        assert recovered == sorted(r.request_id for r in accepted)
        assert with_client(server.url, config, lambda client: client.depth(MODEL)) == 20


def test_output_stream_expires_after_its_final_entry(redis_url: str) -> None:
    config = QueueConfig(output_ttl_s=0.3)
    key = KEYS.output("r")
    with EngineQueue(redis_url, config) as engine, redis.Redis.from_url(redis_url) as raw:
        engine.append([TokenChunk("r", 0, (1, 2))])
        assert raw.pttl(key) == -1, "a running request's output must not expire"
        engine.append([TokenChunk("r", 2, (3,), finish_reason=FinishReason.STOP)])
        assert 0 < raw.pttl(key) <= 300
        time.sleep(0.45)
        assert raw.exists(key) == 0


def test_model_names_that_would_collide_with_shared_keys_are_refused(redis_url: str) -> None:
    with EngineQueue(redis_url) as engine, pytest.raises(InvalidParameterError) as refused:
        engine.claim("out:x", "e", 1, 0)
    assert refused.value.field == "model"


def test_codec_round_trips_requests_and_chunks() -> None:
    assert decode_request(
        {k.encode(): v for k, v in encode_request(request("r", (0, 2**32 - 1))).items()}
    ) == (request("r", (0, 2**32 - 1)))
    chunk = TokenChunk("r", 4, (1, 2), FinishReason.STOP, Usage(3, 6, 1), "", (-1.0, -0.5))
    assert decode_chunk("r", {k.encode(): v for k, v in encode_chunk(chunk).items()}) == chunk
    with pytest.raises(InvalidParameterError) as refused:
        encode_request(request("r", (-1,)))
    assert refused.value.field == "prompt_token_ids"


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(0, 1000), min_size=1, max_size=30), data=st.data())
def test_reader_sees_each_index_once_for_any_overlap_and_read_split(
    tokens: list[int], data: st.DataObject
) -> None:
    # Writer b resumes from a point writer a had already reached; after that both keep writing.
    first = _split(tokens, 0, data)
    cut = data.draw(st.integers(0, len(tokens)))
    reached = next(i for i, chunk in enumerate(first) if chunk.start_index >= cut)
    merged, rest, second = first[:reached], first[reached:], _split(tokens, cut, data)
    while rest or second:
        source = rest if not second or (rest and data.draw(st.booleans())) else second
        merged.append(source.pop(0))
    entries = [(f"{i + 1}-0", chunk) for i, chunk in enumerate(merged)]
    cursor = OutputCursor("r")
    seen: list[tuple[int, int]] = []
    while entries:
        take = data.draw(st.integers(1, len(entries)))
        batch, cursor = advance(cursor, entries[:take])
        entries = entries[take:]
        seen.extend(
            (chunk.start_index + i, token) for chunk in batch for i, token in enumerate(chunk.token_ids)
        )
    assert seen == list(enumerate(tokens))
    assert cursor.finished


def _split(tokens: list[int], start: int, data: st.DataObject) -> list[TokenChunk]:
    """One writer's chunks from ``start`` to the end, in random sizes, then its final chunk."""
    chunks, index = [], start
    while index < len(tokens):
        size = data.draw(st.integers(1, len(tokens) - index))
        chunks.append(TokenChunk("r", index, tuple(tokens[index : index + size])))
        index += size
    chunks.append(TokenChunk("r", len(tokens), (), FinishReason.STOP))
    return chunks


# ---- priority across the queue, and claims that fit the engine's KV cache -------------------
def prioritized(request_id: str, priority: int, prompt_tokens: int = 3) -> GenerationRequest:
    params = SamplingParams(temperature=0.0, max_tokens=8, seed=7)
    return GenerationRequest(request_id, MODEL, tuple(range(1, prompt_tokens + 1)), params, priority=priority)


def ids(claimed: list[ClaimedRequest]) -> list[str]:
    return [item.request.request_id for item in claimed]


def test_urgent_request_sent_behind_a_hundred_queued_ones_is_claimed_first(redis_url: str) -> None:
    config = QueueConfig(max_queue_depth=200)
    background = [prioritized(f"bg{i:03}", 10) for i in range(100)]
    enqueue_all(redis_url, config, *background, prioritized("urgent", 0), prioritized("most-urgent", -3))
    with EngineQueue(redis_url, config) as engine:
        assert ids(engine.claim(MODEL, "e", 1, 0)) == ["most-urgent"]
        assert ids(engine.claim(MODEL, "e", 3, 0)) == ["urgent", "bg000", "bg001"]
        enqueue_all(redis_url, config, prioritized("late", 5))
        rest = ids(engine.claim(MODEL, "e", 200, 0))
    assert rest == ["late", *(r.request_id for r in background[2:])], "bands in order, each in arrival order"


def test_admission_bound_counts_every_priority(redis_url: str) -> None:
    config = QueueConfig(max_queue_depth=2)
    enqueue_all(redis_url, config, prioritized("a", 5), prioritized("b", -1))
    with pytest.raises(QueueFullError):
        enqueue_all(redis_url, config, prioritized("c", 0))
    with pytest.raises(InvalidParameterError) as refused:
        enqueue_all(redis_url, QueueConfig(), prioritized("d", 16))
    assert refused.value.field == "priority"


def test_claim_takes_only_prompts_that_fit_the_free_kv_blocks(redis_url: str) -> None:
    config = QueueConfig()
    # blocks of 4 tokens; a prompt of n tokens needs ceil((n + 1) / 4) blocks
    enqueue_all(redis_url, config, prioritized("big", 0, 19), prioritized("s1", 0), prioritized("s2", 0))
    with EngineQueue(redis_url, config) as engine, redis.Redis.from_url(redis_url) as raw:
        busy = KvBudget(free_blocks=4, block_size=4, total_blocks=64)
        assert engine.claim(MODEL, "busy", 8, 0, busy) == [], "big needs 5 blocks; nothing behind it passes"
        assert raw.xpending(KEYS.for_model(MODEL).requests, "engines")["pending"] == 0, "nothing held"
        roomy = KvBudget(free_blocks=6, block_size=4, total_blocks=64)
        assert ids(engine.claim(MODEL, "roomy", 8, 0, roomy)) == ["big", "s1"], "5 + 1 blocks, then full"
        assert ids(engine.claim(MODEL, "busy", 8, 0, busy)) == ["s2"]


def test_prompt_larger_than_the_whole_kv_cache_is_taken_to_be_failed_not_left_queued(redis_url: str) -> None:
    config = QueueConfig()
    enqueue_all(redis_url, config, prioritized("huge", 0, 40), prioritized("next", 0))
    with EngineQueue(redis_url, config) as engine:
        tiny = KvBudget(free_blocks=1, block_size=4, total_blocks=8)
        assert ids(engine.claim(MODEL, "e", 8, 0, tiny)) == ["huge", "next"], "huge fits no replica"


def test_idle_claim_wakes_when_a_request_is_enqueued(redis_url: str) -> None:
    config = QueueConfig()
    with EngineQueue(redis_url, config) as engine:
        started = time.monotonic()
        assert engine.claim(MODEL, "e", 1, block_ms=300) == []
        assert time.monotonic() - started >= 0.25, "an empty queue is waited on, not polled"

        def enqueue_later() -> None:
            time.sleep(0.3)
            enqueue_all(redis_url, config, prioritized("wake", 7))

        waker = threading.Thread(target=enqueue_later)
        started = time.monotonic()
        waker.start()
        claimed = engine.claim(MODEL, "e", 1, block_ms=5000)
        waker.join()
    assert ids(claimed) == ["wake"]
    assert time.monotonic() - started < 2.0


def test_leases_hand_back_and_reclaim_across_priorities(redis_url: str) -> None:
    config = QueueConfig(lease_s=0.3, max_deliveries=2)
    enqueue_all(redis_url, config, prioritized("low", 9), prioritized("mid", 0), prioritized("high", -9))
    with EngineQueue(redis_url, config) as engine:
        held = {item.request.request_id: item.entry_id for item in engine.claim(MODEL, "a", 3, 0)}
        assert held["mid"].count("/") == 0 and held["low"].startswith("9/"), "tickets name the band"
        assert engine.renew(MODEL, "a", list(held.values())) == set()
        assert engine.hand_back(MODEL, "a", [held["low"], held["high"]]) == 2
        assert ids(engine.reclaim_expired(MODEL, "b", 4)) == ["high", "low"], "most urgent band first"
        time.sleep(0.35)
        assert ids(engine.reclaim_expired(MODEL, "c", 4)) == ["high", "mid", "low"]
        assert engine.renew(MODEL, "a", list(held.values())) == set(held.values()), "a lost them all"
        assert with_client(redis_url, config, lambda client: client.cancel(MODEL, "low")) is True
        assert engine.cancelled(MODEL, ["low", "mid"]) == {"low"}
        assert engine.finish(MODEL, held["mid"], "mid") is True
        time.sleep(0.35)
        assert ids(engine.reclaim_expired(MODEL, "d", 4)) == [], "high and low: third delivery"
    assert [read_all(redis_url, rid)[-1].finish_reason for rid in ("high", "low")] == [FinishReason.ERROR] * 2
    assert with_client(redis_url, config, lambda client: client.depth(MODEL)) == 0


def test_entry_queued_before_priority_bands_existed_is_claimed_and_released(redis_url: str) -> None:
    """The layout before bands: one stream, entry ids as tickets. Priority 0 kept both."""
    keys = KEYS.for_model(MODEL)
    with redis.Redis.from_url(redis_url) as raw:
        raw.xgroup_create(keys.requests, "engines", id="0", mkstream=True)
        entry_id = raw.xadd(keys.requests, encode_request(prioritized("old", 0))).decode()
        raw.hset(keys.active, "old", entry_id)
    with EngineQueue(redis_url, QueueConfig()) as engine:
        engine.ensure_group(MODEL)  # what every engine replica does when it starts
        (claimed,) = engine.claim(MODEL, "e", 4, 0)
        assert (claimed.request.request_id, claimed.entry_id) == ("old", entry_id)
        assert engine.finish(MODEL, claimed.entry_id, "old") is True


def _hlen_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_hlen", {}).get("calls", 0))


def test_early_admission_check_trusts_a_fresh_reading_under_half_the_bound(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ensure_room asks Redis unless this client saw the queue under half its bound within
    TRUSTED_DEPTH_S (its own enqueues report the depth); enqueue still refuses at the bound
    when other clients filled the queue meanwhile."""
    trusted_s = 1.0  # longer than the default, so that a slow machine cannot age a reading by accident
    monkeypatch.setattr(client_queue, "TRUSTED_DEPTH_S", trusted_s)
    config = QueueConfig(max_queue_depth=4)

    async def body(client: QueueClient) -> list[int]:
        with redis.Redis.from_url(redis_url) as raw:
            asked = []

            async def ask() -> None:
                before = _hlen_calls(raw)
                await client.ensure_room(MODEL)
                asked.append(_hlen_calls(raw) - before)

            await ask()  # nothing seen yet
            await ask()  # depth 0, just read
            await client.enqueue(request("a"))  # reports depth 1
            await ask()
            await asyncio.sleep(trusted_s)
            await ask()  # the reading is stale
            await client.enqueue(request("b"))  # depth 2: half the bound
            await ask()
            await client.enqueue(request("c"))  # depth 3, another client takes the last slot:
            async with QueueClient(redis_url, config) as other:
                await other.enqueue(request("d"))
            with pytest.raises(QueueFullError):
                await client.ensure_room(MODEL)  # at half the bound or more it always asks
            return asked

    assert with_client(redis_url, config, body) == [1, 0, 0, 1, 1]

    async def trusting(client: QueueClient) -> None:
        await client.ensure_room("other-model")  # depth 0 seen ...
        async with QueueClient(redis_url, config) as other:
            for name in ("e", "f", "g", "h"):
                await other.enqueue(replace(request(name), model="other-model"))
        await client.ensure_room("other-model")  # ... and trusted: no refusal here,
        with pytest.raises(QueueFullError):
            await client.enqueue(replace(request("i"), model="other-model"))  # the gate refuses

    with_client(redis_url, config, trusting)
