"""The engine's step writer: one step's output goes to Redis while the engine computes the next.

The engine loop hands over the chunks of step N and goes on with step N+1; before it
hands over step N+1 it collects the result of step N's write. So at most one write
is in flight and the loop is never more than one step ahead of Redis. A write is one
pipeline: the chunks, the acknowledgements of requests whose final chunk it carries
(or that an earlier write completed), the poll for cancellations, and whether any request
waits to be claimed. When one does and the loop offered room, the writer claims it right
after the write (a second round trip, still off the loop's path): a busy engine takes new
work without stopping its steps for Redis, and the loop admits it when it collects the write.

Everything a write carries is idempotent (readers skip token indices they have, a
second acknowledgement frees nothing), so a write that failed is simply sent again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from services.errors import QueueUnavailableError
from services.messages import TokenChunk
from services.queue.engine_output import StepReply
from services.queue.engine_queue import ClaimedRequest, EngineQueue, KvBudget

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimOffer:
    """Room the loop offers for new work with a write: free batch slots and the KV budget."""

    slots: int
    kv: KvBudget


@dataclass(frozen=True)
class WriteResult:
    """A settled write. On failure (``error`` set) nothing of it counts: send ``chunks`` and
    ``acknowledged`` again."""

    chunks: list[TokenChunk]
    acknowledged: dict[str, str]  # request id -> queue entry id
    cancelled: set[str] = field(default_factory=set)
    work_waiting: bool = True  # False: no request waited to be claimed when the write ran
    claimed: list[ClaimedRequest] = field(default_factory=list)  # taken after the write: admit them
    error: QueueUnavailableError | None = None


@dataclass
class _InFlight:
    chunks: list[TokenChunk]
    acknowledged: dict[str, str]
    future: Future[tuple[StepReply, list[ClaimedRequest]]]


class OutputWriter:
    def __init__(
        self,
        queue: EngineQueue,
        model: str,
        consumer: str,
        on_thread_start: Callable[[], object] | None = None,
    ) -> None:
        """``consumer``: the replica's name in the queue, for claims. ``on_thread_start``: run
        first on the writer thread (the replica gives it the engine loop's CPU priority)."""
        self._queue = queue
        self._model = model
        self._consumer = consumer
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="engine-writer", initializer=on_thread_start
        )
        self._in_flight: _InFlight | None = None

    @property
    def busy(self) -> bool:
        return self._in_flight is not None

    def submit(
        self,
        chunks: Sequence[TokenChunk],
        acknowledged: Mapping[str, str],
        poll: Sequence[str],
        offer: ClaimOffer | None = None,
    ) -> None:
        """Start writing ``chunks``, acknowledging ``acknowledged`` and polling cancellations of
        ``poll``; with ``offer``, claim what fits it if the write sees work waiting. The previous
        write must have been settled."""
        if self._in_flight is not None:
            raise RuntimeError("settle the write in flight before submitting another")
        chunks, acknowledged = list(chunks), dict(acknowledged)
        future = self._executor.submit(self._write, chunks, list(poll), acknowledged, offer)
        self._in_flight = _InFlight(chunks, acknowledged, future)

    def _write(
        self,
        chunks: list[TokenChunk],
        poll: list[str],
        acknowledged: dict[str, str],
        offer: ClaimOffer | None,
    ) -> tuple[StepReply, list[ClaimedRequest]]:
        reply = self._queue.append_and_poll_cancels(self._model, chunks, poll, acknowledged)
        if offer is None or not reply.work_waiting:
            return reply, []
        try:
            return reply, self._queue.claim(self._model, self._consumer, offer.slots, 0, offer.kv)
        except QueueUnavailableError:
            # The write counted; the next one meets the outage. A claim that ran before its reply
            # was lost leaves its entries pending under this replica's name: the periodic
            # reclaim takes them back once their lease runs out.
            logger.warning("claim after a step write failed", extra={"model": self._model})
            return reply, []

    def settle(self) -> WriteResult | None:
        """Wait for the write in flight (None when there is none) and report how it went."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return None
        try:
            reply, claimed = in_flight.future.result()
        except QueueUnavailableError as error:
            return WriteResult(in_flight.chunks, in_flight.acknowledged, error=error)
        return WriteResult(
            in_flight.chunks, in_flight.acknowledged, reply.cancelled, reply.work_waiting, claimed
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True)
