"""One reader per ingress replica: every open call's text comes from one blocking read.

Open calls subscribe by request id. A single task reads the text streams of all of
them (and the replica's wake-up stream, which a new call pokes so the read picks it
up at once) with one blocking XREAD, and hands each entry to its subscribers in
process. Redis connections per replica stay a small constant however many streams
are open, and a token costs one read slot shared with every other stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from services.errors import QueueUnavailableError
from services.messages import TextDelta, merge_text_deltas
from services.queue import QueueClient
from services.queue.outage import Backoff
from services.queue.output_stream import STREAM_START

logger = logging.getLogger(__name__)

# With no new text anywhere the read is re-issued this often; it returns at once when text arrives.
READ_BLOCK_MS = 1000


@dataclass(eq=False)
class _Subscription:
    from_token: int
    inbox: asyncio.Queue[TextDelta | QueueUnavailableError] = field(default_factory=asyncio.Queue)
    # A call that joins a request another call on this replica already follows first reads
    # the entries before the shared cursor; what the reader brings meanwhile waits here.
    backlog: list[TextDelta] | None = None

    def deliver(self, deltas: list[TextDelta]) -> None:
        """What one read brought, as one message (skipping what the client already has)."""
        if self.backlog is not None:
            self.backlog.extend(deltas)
            return
        wanted = []
        for delta in deltas:
            # Skipping by token index also drops what a second detokenizer wrote for the same
            # tokens while two replicas briefly both held a request (a takeover after an outage).
            part = delta.from_token(self.from_token)
            if part is not None:
                wanted.append(part)
                self.from_token = part.token_index + len(part.token_ids)
        if wanted:
            self.inbox.put_nowait(merge_text_deltas(wanted))


class TextFanout:
    def __init__(
        self,
        queue: QueueClient,
        wake_key: str,
        outage_limit_s: float,
        busy_pause_s: Callable[[int], float] = lambda streams: 0.0,
    ) -> None:
        """``busy_pause_s``: how long to wait after a read while following that many streams
        (``QueueConfig.busy_pause_s``)."""
        self._queue = queue
        self._wake_key = wake_key
        self._outage_limit_s = outage_limit_s
        self._busy_pause_s = busy_pause_s
        self._subscribers: dict[str, list[_Subscription]] = {}
        self._cursors: dict[str, str] = {}  # request id -> last text entry read
        self._wake_after = STREAM_START
        self._reader: asyncio.Task[None] | None = None
        self._waker: asyncio.Task[None] | None = None
        self._wake_wanted = False
        self._reading = False  # a read is out: streams that joined since are not in it
        self._closed = False

    @property
    def open_streams(self) -> int:
        return len(self._subscribers)

    async def follow(self, request_id: str, from_token: int = 0) -> AsyncIterator[TextDelta]:
        """The request's text deltas from output token ``from_token`` on, until the last one.

        Raises QueueUnavailableError when Redis stays away longer than the outage limit.
        A ``from_token`` inside a text entry cuts it (``TextDelta.from_token``).
        """
        subscription = _Subscription(from_token)
        shared_cursor = self._cursors.get(request_id)
        self._subscribers.setdefault(request_id, []).append(subscription)
        if shared_cursor is None:
            self._cursors[request_id] = STREAM_START
        else:
            subscription.backlog = []
        self._ensure_reader()
        try:
            if shared_cursor is None:
                self._wake_reader()
            else:
                history = await self._queue.read_text_range(request_id, shared_cursor)
                backlog, subscription.backlog = subscription.backlog or [], None
                subscription.deliver(history + backlog)
            while True:
                item = await subscription.inbox.get()
                if isinstance(item, QueueUnavailableError):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._unsubscribe(request_id, subscription)

    def _unsubscribe(self, request_id: str, subscription: _Subscription) -> None:
        remaining = [s for s in self._subscribers.get(request_id, []) if s is not subscription]
        if remaining:
            self._subscribers[request_id] = remaining
        else:
            self._subscribers.pop(request_id, None)
            self._cursors.pop(request_id, None)

    def _wake_reader(self) -> None:
        """Make the blocked read start over with the new call's stream. A burst of new calls
        costs at most two wake-ups in a row: one in flight, one sent after it for the rest.
        A reader between reads (delivering, or pausing while busy) takes every open stream
        into its next read: no wake-up then, which under load spares most calls a round trip."""
        if not self._reading:
            return
        self._wake_wanted = True
        if self._waker is None or self._waker.done():
            self._waker = asyncio.get_running_loop().create_task(self._send_wakes())

    async def _send_wakes(self) -> None:
        while self._wake_wanted:
            self._wake_wanted = False
            try:
                await self._queue.wake(self._wake_key)
            except QueueUnavailableError:
                return  # the reader is waiting out the outage and re-reads every stream after it

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_forever())

    async def aclose(self) -> None:
        """Stop the reader (and a pending wake-up); open calls get nothing more."""
        self._closed = True
        for task in (self._reader, self._waker):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _read_forever(self) -> None:
        outage = Backoff()
        while not self._closed:
            try:
                texts, self._wake_after = await self._read_once()
            except QueueUnavailableError as error:
                if outage.elapsed_s > self._outage_limit_s:
                    self._fail_all(error)
                    outage.reset()
                await asyncio.sleep(outage.next_delay())
                continue
            except Exception:  # never leave open calls without a reader
                logger.exception("text reader failed; retrying")
                await asyncio.sleep(outage.next_delay())
                continue
            outage.reset()
            for request_id, entries in texts.items():
                if request_id not in self._cursors or not entries:
                    continue  # the call ended while the read was in flight
                self._cursors[request_id] = entries[-1][0]
                for subscription in self._subscribers.get(request_id, []):
                    subscription.deliver([delta for _, delta in entries])
            pause_s = self._busy_pause_s(len(self._subscribers))
            if pause_s:
                await asyncio.sleep(pause_s)  # let text gather: one message carries several tokens

    async def _read_once(self) -> tuple[dict[str, list[tuple[str, TextDelta]]], str]:
        """One blocking read of every stream open now (and the wake-up stream)."""
        read = self._queue.read_texts(dict(self._cursors), self._wake_key, self._wake_after, READ_BLOCK_MS)
        self._reading = True
        try:
            return await read
        finally:
            self._reading = False

    def _fail_all(self, error: QueueUnavailableError) -> None:
        for subscriptions in self._subscribers.values():
            for subscription in subscriptions:
                subscription.inbox.put_nowait(error)
