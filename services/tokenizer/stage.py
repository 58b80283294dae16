"""The tokenizer replica's loop over the call stream: take calls, encode, answer, repeat.

Every call read in one turn is encoded as one batch per model (``encode_many``), and every
reply goes back in one pipeline. Now and then the loop also takes over calls that a dead
replica left unanswered (``QueueConfig.tokenize_reclaim_s``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import ResponseError

from services.errors import QueueUnavailableError
from services.queue.group_errors import is_missing_group
from services.queue.outage import Backoff
from services.queue.tokenize_calls import TokenizeCall, TokenizeCalls
from services.tokenizer import wire
from services.tokenizer.prompt import Prompt
from services.tokenizer.replies import MAX_PROMPTS_PER_CALL, Encoded

logger = logging.getLogger(__name__)

TAKE_BLOCK_MS = 1000  # an idle replica re-issues its read this often (and looks for orphans)
MAX_CALLS_PER_TURN = 64

EncodeMany = Callable[[list[tuple[str, Prompt]]], Awaitable[list[Encoded]]]


class TokenizeStage:
    def __init__(
        self, calls: TokenizeCalls, consumer: str, encode_many: EncodeMany, reclaim_every_s: float
    ) -> None:
        self._calls = calls
        self._consumer = consumer
        self._encode_many = encode_many
        self._reclaim_every_s = reclaim_every_s
        self._next_reclaim = 0.0
        self._stopping = False

    def stop(self) -> None:
        """End ``run`` at its next turn (within TAKE_BLOCK_MS): a cancelled blocking read may be
        retried by redis-py rather than end, so cancelling alone is not enough."""
        self._stopping = True

    async def run(self) -> None:
        """Serve calls until stopped; a Redis outage is waited out."""
        outage = Backoff()
        while not self._stopping:
            try:
                if outage.waiting or self._next_reclaim == 0.0:
                    await self._calls.ensure_group()  # Redis may have come back empty
                await self.turn()
            except ResponseError as error:
                if not is_missing_group(error):
                    raise
                await self._calls.ensure_group()  # Redis restarted empty between two reads
            except QueueUnavailableError:
                if not outage.waiting:
                    logger.warning("queue unavailable; tokenizer calls wait for Redis")
                await asyncio.sleep(outage.next_delay())
                continue
            outage.reset()

    async def turn(self) -> int:
        """Answer what there is (waiting up to TAKE_BLOCK_MS for a call); returns how many."""
        taken: list[TokenizeCall] = []
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + self._reclaim_every_s
            taken = await self._calls.reclaim(self._consumer, MAX_CALLS_PER_TURN)
            if taken:
                logger.info("took over tokenizer calls", extra={"calls": len(taken)})
        if not taken:
            taken = await self._calls.take(self._consumer, MAX_CALLS_PER_TURN, TAKE_BLOCK_MS)
        if taken:
            await self._calls.answer(await self._answers(taken))
        return len(taken)

    async def _answers(self, calls: list[TokenizeCall]) -> list[tuple[TokenizeCall, bytes]]:
        readable: list[tuple[TokenizeCall, list[tuple[str, Prompt]]]] = []
        answers: list[tuple[TokenizeCall, bytes]] = []
        for call in calls:
            try:
                readable.append((call, wire.decode_call(call.payload)[:MAX_PROMPTS_PER_CALL]))
            except (ValueError, KeyError, TypeError):  # not from a tokenline ingress: drop it
                logger.warning("malformed tokenizer call dropped", extra={"entry_id": call.entry_id})
                answers.append((call, wire.encode_reply([])))
        try:
            encoded = await self._encode_many([prompt for _, prompts in readable for prompt in prompts])
        except QueueUnavailableError:
            raise  # the calls stay pending; they are taken over (by this replica too) after the outage
        except Exception as error:  # answered as failed, so that no replica takes them again and again
            logger.exception("tokenizer calls failed", extra={"calls": len(calls)})
            failure = wire.encode_failure(f"{type(error).__name__}: {error}")
            return answers + [(call, failure) for call, _ in readable]
        start = 0
        for call, prompts in readable:
            answers.append((call, wire.encode_reply(encoded[start : start + len(prompts)])))
            start += len(prompts)
        return answers
