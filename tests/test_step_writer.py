"""The engine's step writer against a real Redis: a write that sees work waiting claims what
fits the room the loop offered, and nothing without an offer."""

from __future__ import annotations

import asyncio

from services.messages import GenerationRequest, SamplingParams, TokenChunk
from services.queue import EngineQueue, KvBudget, QueueClient, QueueConfig
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
            assert result is not None and result.work_waiting and result.claimed == []

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
            assert result is not None and not result.work_waiting and result.claimed == []
        finally:
            writer.close()
