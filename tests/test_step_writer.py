"""The engine's step writer against a real Redis: a write claims what fits the room the loop
offered, and nothing without an offer; it claims even when Redis does not hold the claim script;
a write whose connection Redis dropped is reported failed, whole, and the next one goes through."""

from __future__ import annotations

import asyncio

import redis

from services.messages import GenerationRequest, SamplingParams, TokenChunk
from services.queue import EngineQueue, KvBudget, QueueClient, QueueConfig, codec
from services.queue.keys import QueueKeys
from services.queue.output_stream import collect_tokens
from services.queue.redis_server import RedisServer
from services.queue.step_writer import ClaimOffer, OutputWriter

MODEL = "writer-model"
CONFIG = QueueConfig(lease_s=30.0)


def enqueue(redis_url: str, request_id: str, prompt_tokens: int) -> None:
    request = GenerationRequest(
        request_id, MODEL, tuple(range(1, prompt_tokens + 1)), SamplingParams(max_tokens=4)
    )

    async def main() -> None:
        async with QueueClient(redis_url, CONFIG) as client:
            await client.enqueue(request)

    asyncio.run(main())


def test_write_claims_what_fits_the_offer_and_nothing_without_one(redis_url: str) -> None:
    with EngineQueue(redis_url, CONFIG) as queue:
        queue.ensure_group(MODEL)
        writer = OutputWriter(queue, MODEL, "writer-consumer")
        try:
            enqueue(redis_url, "first", prompt_tokens=20)  # 2 blocks of 16 with its next token
            enqueue(redis_url, "second", prompt_tokens=40)  # 3 blocks
            writer.submit([TokenChunk("running", 0, (7,))], {}, ["running"])
            result = writer.settle()
            assert result is not None and result.claimed == [], "no offer, no claim"

            writer.submit([], {}, ["running"], ClaimOffer(slots=4, kv=KvBudget(4, 16, 64)))
            result = writer.settle()
            assert result is not None and result.error is None
            assert [c.request.request_id for c in result.claimed] == ["first"], "'second' does not fit"
            assert not result.claimed[0].cancelled and not result.claimed[0].reclaimed

            writer.submit([], {}, ["running"], ClaimOffer(slots=4, kv=KvBudget(8, 16, 64)))
            result = writer.settle()
            assert result is not None
            assert [c.request.request_id for c in result.claimed] == ["second"]

            writer.submit([], {}, ["running"], ClaimOffer(slots=4, kv=KvBudget(8, 16, 64)))
            result = writer.settle()
            assert result is not None and result.claimed == []
        finally:
            writer.close()


def test_a_write_claims_after_redis_lost_its_scripts(redis_url: str) -> None:
    with EngineQueue(redis_url, CONFIG) as queue, redis.Redis.from_url(redis_url) as admin:
        queue.ensure_group(MODEL)
        writer = OutputWriter(queue, MODEL, "writer-consumer")
        try:
            enqueue(redis_url, "waiting", prompt_tokens=4)
            admin.script_flush()  # what a restarted Redis holds: no scripts
            writer.submit([], {}, [], ClaimOffer(slots=4, kv=KvBudget(8, 16, 64)))
            result = writer.settle()
            assert result is not None and result.error is None
            assert [c.request.request_id for c in result.claimed] == ["waiting"]
        finally:
            writer.close()


def test_a_write_redis_dropped_is_reported_whole_and_the_next_goes_through() -> None:
    # A Redis of its own: the test drops every client connection but its own.
    with (
        RedisServer() as server,
        EngineQueue(server.url, CONFIG) as queue,
        redis.Redis.from_url(server.url) as admin,
    ):
        queue.ensure_group(MODEL)
        writer = OutputWriter(queue, MODEL, "writer-consumer")
        try:
            writer.submit([TokenChunk("r", 0, (5,))], {}, ["r"])
            first = writer.settle()
            assert first is not None and first.error is None

            admin.client_kill_filter(_type="normal", skipme=True)  # the writer's connection, among others
            lost = [TokenChunk("r", 1, (6,))]
            writer.submit(lost, {"r": "0-0"}, ["r"])
            failed = writer.settle()
            assert failed is not None and failed.error is not None, "a dropped connection must fail the write"
            assert failed.chunks == lost and failed.acknowledged == {"r": "0-0"}, "given back whole"

            writer.submit([*failed.chunks, TokenChunk("r", 2, (7,))], {}, ["r"])
            again = writer.settle()
            assert again is not None and again.error is None
            entries = admin.xrange(QueueKeys(CONFIG.key_prefix).output("r"))
            tokens, ended = collect_tokens("r", codec.decode_chunk_entries("r", entries))
            assert tokens == [5, 6, 7] and not ended
        finally:
            writer.close()
