"""Engine replicas pull only what fits their KV cache: real engines on the demo model and a real
Redis, two replicas in this process (the queue is their only link, as in the stack)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from services.engine.config import EngineConfig
from services.engine.replica import EngineReplica
from services.messages import FinishReason, GenerationRequest, SamplingParams, TokenChunk
from services.queue import QueueClient, QueueConfig, codec
from services.queue.keys import ENGINE_GROUP, QueueKeys

MODEL = "demo"
BLOCK_SIZE = 16
KV_BLOCKS = 128  # 2,048 tokens per replica
QUEUE = QueueConfig(lease_s=30.0)  # nothing is reclaimed while a test runs


@contextmanager
def replica(model_dir: Path, redis_url: str, kv_blocks: int = KV_BLOCKS) -> Iterator[EngineReplica]:
    config = EngineConfig(
        model=str(model_dir),
        block_size=BLOCK_SIZE,
        num_kv_blocks=kv_blocks,
        max_num_seqs=4,
        max_num_batched_tokens=512,
    )
    running = EngineReplica(MODEL, config, redis_url, QUEUE)
    try:
        yield running
    finally:
        running.stop(drain_s=0.0)


def enqueue(redis_url: str, request_id: str, prompt_tokens: int, max_tokens: int, first_id: int) -> None:
    # Distinct token patterns per request, so that no prompt is a prefix-cache hit of another.
    prompt = tuple(first_id + i % 7 for i in range(prompt_tokens))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    async def main() -> None:
        async with QueueClient(redis_url, QUEUE) as client:
            await client.enqueue(GenerationRequest(request_id, MODEL, prompt, params))

    asyncio.run(main())


def output(redis_url: str, request_id: str) -> list[TokenChunk]:
    with redis.Redis.from_url(redis_url) as raw:
        entries = raw.xrange(QueueKeys(QUEUE.key_prefix).output(request_id))
    return [chunk for _, chunk in codec.decode_chunk_entries(request_id, entries)]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.02)


def finished(redis_url: str, request_id: str) -> bool:
    chunks = output(redis_url, request_id)
    return bool(chunks) and chunks[-1].finish_reason is not None


def run_long(busy: EngineReplica, redis_url: str, prompt_tokens: int, max_tokens: int) -> None:
    """Give ``busy`` a request named 'long' and wait until it holds it."""
    enqueue(redis_url, "long", prompt_tokens=prompt_tokens, max_tokens=max_tokens, first_id=3)
    wait_for(lambda: "long" in busy.status().held_request_ids, 60, "the busy replica to take 'long'")


def test_busy_replica_leaves_a_prompt_it_has_no_blocks_for_to_a_replica_that_has(
    demo_model_dir: Path, redis_url: str
) -> None:
    with replica(demo_model_dir, redis_url) as busy:
        run_long(busy, redis_url, prompt_tokens=1200, max_tokens=800)  # 76 of 128 blocks: 52 left
        enqueue(redis_url, "big", prompt_tokens=900, max_tokens=4, first_id=11)  # needs 57 blocks
        deadline = time.monotonic() + 0.5  # hundreds of steps; 'long' runs for 800
        while time.monotonic() < deadline:  # busy has free batch slots; each step write claims
            held = busy.status().held_request_ids
            assert "long" in held, "'long' ended early: the check proved nothing"
            assert "big" not in held, "a replica without room took 'big'"
            time.sleep(0.02)
        with redis.Redis.from_url(redis_url) as raw:
            pending = raw.xpending(QueueKeys(QUEUE.key_prefix).for_model(MODEL).requests, ENGINE_GROUP)
        assert pending["pending"] == 1, "only 'long' is held; 'big' waits in the queue, free for anyone"
        with replica(demo_model_dir, redis_url) as idle:
            wait_for(lambda: finished(redis_url, "big"), 120, "the idle replica to run 'big'")
            assert idle.engine.stats.prefill_tokens_computed >= 900
        chunks = output(redis_url, "big")
        assert chunks[-1].finish_reason is FinishReason.LENGTH
        assert sum(len(chunk.token_ids) for chunk in chunks) == 4


def test_busy_replica_starts_a_request_that_fits_while_its_running_one_goes_on(
    demo_model_dir: Path, redis_url: str
) -> None:
    """A busy replica's claims ride on its step writes: work that arrives mid-run starts at once."""
    with replica(demo_model_dir, redis_url) as busy:
        run_long(busy, redis_url, prompt_tokens=64, max_tokens=1500)
        enqueue(redis_url, "short", prompt_tokens=16, max_tokens=4, first_id=11)
        wait_for(lambda: finished(redis_url, "short"), 30, "'short' to finish")
        assert not finished(redis_url, "long"), "'long' ended first: the check proved nothing"
        assert sum(len(chunk.token_ids) for chunk in output(redis_url, "short")) == 4


def test_prompt_larger_than_a_replicas_whole_kv_cache_ends_with_an_error_naming_its_length(
    demo_model_dir: Path, redis_url: str
) -> None:
    with replica(demo_model_dir, redis_url, kv_blocks=8) as small:  # 128 tokens in all
        enqueue(redis_url, "too-long", prompt_tokens=200, max_tokens=4, first_id=5)
        wait_for(lambda: finished(redis_url, "too-long"), 60, "the request to end")
        # The final chunk is visible once the writer has stored it; the replica lets go of the
        # request when it settles that write, on its next turn of the loop.
        wait_for(lambda: small.status().held_request_ids == (), 10, "the replica to release it")
    final = output(redis_url, "too-long")[-1]
    assert final.finish_reason is FinishReason.ERROR
    assert "prompt of 200 tokens" in final.error and "KV blocks" in final.error
    with redis.Redis.from_url(redis_url) as raw:
        assert raw.hlen(QueueKeys(QUEUE.key_prefix).for_model(MODEL).active) == 0, "released, not queued"
