"""The engine's step writer: one step's output goes to Redis while the engine computes the next.

The engine loop sends the write of step N on the writer's own connection and goes on with
step N+1; before it sends step N+1's write it reads step N's replies, which have waited in
the socket meanwhile. So at most one write is in flight and the loop is never more than one
step ahead of Redis. A write is one pipeline: the chunks, the acknowledgements of requests
whose final chunk it carries (or that an earlier write completed), the poll for
cancellations and, when the loop offers room, a claim of what fits it: a busy engine takes
new work without stopping its steps for Redis.

Send and read happen on the loop's own thread. An earlier version handed each write to a
writer thread; that thread woke for every reply and took the interpreter lock from the
loop between two torch calls, which cost the loop more than the write itself (a step of
the demo model in a closed loop: 1.2 ms alone, 2.2-2.3 ms of the loop's CPU beside a writer
thread, 1.5-1.7 ms sending and reading on the loop).

Everything a write carries is idempotent (readers skip token indices they have, a
second acknowledgement frees nothing), so a write that failed is simply sent again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import NoScriptError, ResponseError

from services.errors import QueueUnavailableError
from services.messages import TokenChunk
from services.queue.engine_output import StepWrite
from services.queue.engine_queue import ClaimedRequest, EngineQueue, KvBudget
from services.queue.outage import outage_as_unavailable

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
    claimed: list[ClaimedRequest] = field(default_factory=list)  # taken by the write: admit them
    error: QueueUnavailableError | None = None


@dataclass
class _InFlight:
    chunks: list[TokenChunk]
    acknowledged: dict[str, str]
    write: StepWrite
    offer: ClaimOffer | None  # the write ends with a claim of what fits it
    error: QueueUnavailableError | None = None  # the send failed: nothing to read


class OutputWriter:
    """Sends each step's write and reads its replies a step later, on the caller's thread,
    over one connection of its own. Not thread-safe: the engine loop is its only caller
    (and ``stop``, once the loop has ended)."""

    def __init__(self, queue: EngineQueue, model: str, consumer: str) -> None:
        """``consumer``: the replica's name in the queue, for claims."""
        self._queue = queue
        self._model = model
        self._consumer = consumer
        self._connection: redis.Connection | None = None
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
        """Send a write of ``chunks`` that acknowledges ``acknowledged``, polls cancellations of
        ``poll`` and, with ``offer``, claims what fits it. The previous write must have been
        settled. A failed send is reported by ``settle``, like a failed write."""
        if self._in_flight is not None:
            raise RuntimeError("settle the write in flight before submitting another")
        write = self._queue.step_write(self._model, chunks, poll, acknowledged)
        commands = list(write.commands)
        if offer is not None:
            commands.append(self._queue.claim_command(self._model, self._consumer, offer.slots, offer.kv))
        in_flight = _InFlight(list(chunks), dict(acknowledged), write, offer)
        try:
            with outage_as_unavailable("step_write"):
                connection = self._connection or self._connect()
                packed = connection.pack_commands(commands)  # type: ignore[no-untyped-call]
                connection.send_packed_command(packed)  # type: ignore[no-untyped-call]
        except QueueUnavailableError as error:
            in_flight.error = error
        self._in_flight = in_flight

    def settle(self) -> WriteResult | None:
        """Read the replies of the write in flight (None when there is none) and report how it
        went."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return None
        if in_flight.error is not None:
            return WriteResult(in_flight.chunks, in_flight.acknowledged, error=in_flight.error)
        write = in_flight.write
        try:
            replies = self._read(len(write.commands) + (in_flight.offer is not None))
            reply = self._queue.step_reply(write, replies[: len(write.commands)])
        except QueueUnavailableError as error:
            return WriteResult(in_flight.chunks, in_flight.acknowledged, error=error)
        claimed = [] if in_flight.offer is None else self._claimed(replies[-1], in_flight.offer)
        return WriteResult(in_flight.chunks, in_flight.acknowledged, reply.cancelled, claimed)

    def close(self) -> None:
        """Hand the connection back (a write still in flight is dropped: settle it first)."""
        self._in_flight = None
        if self._connection is not None:
            self._connection.disconnect()  # type: ignore[no-untyped-call]  # replies it may still hold must not reach another caller
            self._queue.release_connection(self._connection)
            self._connection = None

    def _connect(self) -> redis.Connection:
        self._connection = self._queue.own_connection()
        return self._connection

    def _read(self, count: int) -> list[Any]:
        """``count`` replies, an error reply as its exception. A lost connection is closed by
        redis-py (the next send opens a new one) and raises QueueUnavailableError."""
        connection = self._connection
        if connection is None:
            raise RuntimeError("no connection: nothing was sent")
        replies: list[Any] = []
        with outage_as_unavailable("step_write"):
            for _ in range(count):
                try:
                    replies.append(connection.read_response())
                except ResponseError as error:
                    replies.append(error)
        return replies

    def _claimed(self, reply: Any, offer: ClaimOffer) -> list[ClaimedRequest]:
        try:
            if isinstance(reply, NoScriptError):  # not loaded yet, or lost in a restart: claim loads it
                return self._queue.claim(self._model, self._consumer, offer.slots, 0, offer.kv)
            return self._queue.claimed_from(self._model, reply)
        except QueueUnavailableError:
            # The write counted; the next one meets the outage. Entries the claim took stay
            # pending under this replica's name: the periodic reclaim takes them back once
            # their lease runs out.
            logger.warning("reading a step write's claim failed", extra={"model": self._model})
            return []
