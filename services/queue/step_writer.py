"""The engine's step writer: one step's output goes to Redis while the engine computes the next.

The engine loop hands over the chunks of step N and goes on with step N+1; before it
hands over step N+1 it collects the result of step N's write. So at most one write
is in flight and the loop is never more than one step ahead of Redis. A write is one
pipeline: the chunks, the acknowledgements of requests whose final chunk it carries
(or that an earlier write completed), the poll for cancellations, and whether any request
waits to be claimed (so that a busy engine asks the queue for work only when there is some).

Everything a write carries is idempotent (readers skip token indices they have, a
second acknowledgement frees nothing), so a write that failed is simply sent again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from services.errors import QueueUnavailableError
from services.messages import TokenChunk
from services.queue.engine_output import StepReply
from services.queue.engine_queue import EngineQueue


@dataclass(frozen=True)
class WriteResult:
    """A settled write. On failure (``error`` set) nothing of it counts: send ``chunks`` and
    ``acknowledged`` again."""

    chunks: list[TokenChunk]
    acknowledged: dict[str, str]  # request id -> queue entry id
    cancelled: set[str] = field(default_factory=set)
    work_waiting: bool = True  # False: no request waited to be claimed when the write ran
    error: QueueUnavailableError | None = None


@dataclass
class _InFlight:
    chunks: list[TokenChunk]
    acknowledged: dict[str, str]
    future: Future[StepReply]


class OutputWriter:
    def __init__(
        self, queue: EngineQueue, model: str, on_thread_start: Callable[[], object] | None = None
    ) -> None:
        """``on_thread_start``: run first on the writer thread (the replica gives it the engine
        loop's CPU priority)."""
        self._queue = queue
        self._model = model
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="engine-writer", initializer=on_thread_start
        )
        self._in_flight: _InFlight | None = None

    @property
    def busy(self) -> bool:
        return self._in_flight is not None

    def submit(
        self, chunks: Sequence[TokenChunk], acknowledged: Mapping[str, str], poll: Sequence[str]
    ) -> None:
        """Start writing ``chunks``, acknowledging ``acknowledged`` and polling cancellations of
        ``poll``. The previous write must have been settled."""
        if self._in_flight is not None:
            raise RuntimeError("settle the write in flight before submitting another")
        chunks, acknowledged = list(chunks), dict(acknowledged)
        future = self._executor.submit(
            self._queue.append_and_poll_cancels, self._model, chunks, list(poll), acknowledged
        )
        self._in_flight = _InFlight(chunks, acknowledged, future)

    def settle(self) -> WriteResult | None:
        """Wait for the write in flight (None when there is none) and report how it went."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return None
        try:
            reply = in_flight.future.result()
        except QueueUnavailableError as error:
            return WriteResult(in_flight.chunks, in_flight.acknowledged, error=error)
        return WriteResult(in_flight.chunks, in_flight.acknowledged, reply.cancelled, reply.work_waiting)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
