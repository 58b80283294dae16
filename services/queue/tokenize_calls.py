"""Tokenizer calls through Redis: the ingress's prompts to a tokenizer replica and the ids back.

Why not a Ray Serve call: one costs milliseconds of CPU on each side whatever it carries (on
the 2-core test machine ~1.5 ms in the caller and ~3 ms in the tokenizer replica, against
~0.2 ms to encode a prompt), and it adds its own hops to every request's time to first token.
Here a call is one entry in a stream that every tokenizer replica reads as one consumer group
(pulling is the load balancer, as for the engines); the reply goes to the calling replica's
own reply stream, which one task per ingress replica follows with one blocking read.

A call taken by a replica that dies stays pending in the group; a live replica takes it over
once it has waited ``QueueConfig.tokenize_reclaim_s``. Payloads are opaque bytes here
(``services.tokenizer.wire`` gives them their shape). Nothing here is durable state: a call
answered late, after its caller gave up, is dropped by the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from services.errors import QueueUnavailableError
from services.queue import codec
from services.queue.config import QueueConfig
from services.queue.connection import AsyncRedisOwner, async_redis
from services.queue.group_errors import is_existing_group
from services.queue.keys import TOKENIZER_GROUP, QueueKeys
from services.queue.outage import Backoff, guard_async

logger = logging.getLogger(__name__)

READ_BLOCK_MS = 1000  # an idle reader re-issues its read this often
CALL_STREAM_MAX_ENTRIES = 100_000
# Replies kept per reply stream (approximate trim): far more than a caller has out at once.
REPLY_STREAM_MAX_ENTRIES = 4096
_REPLY = b"reply"
_CALL = b"call"
_PAYLOAD = b"payload"


@dataclass(frozen=True)
class TokenizeCall:
    entry_id: str
    reply_to: str
    call_id: str
    payload: bytes


class TokenizeCaller(AsyncRedisOwner):
    """The ingress's side: send a call, wait for its reply on this replica's reply stream."""

    def __init__(self, url: str, config: QueueConfig, replica: str) -> None:
        self._config = config
        keys = QueueKeys(config.key_prefix)
        self._calls_key = keys.tokenize_calls
        self._reply_key = keys.tokenize_replies(replica)
        self._redis = async_redis(url, decode_responses=False)
        self._ids = itertools.count()
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    async def call(self, payload: bytes) -> bytes:
        """The reply to ``payload``. Raises QueueUnavailableError when Redis is away or no
        tokenizer replica answered within ``QueueConfig.tokenize_timeout_s``."""
        call_id = str(next(self._ids))
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = reply
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_forever())
        try:
            await self._send(call_id, payload)
            async with asyncio.timeout(self._config.tokenize_timeout_s):
                return await reply
        except TimeoutError:
            cause = f"no tokenizer replica answered within {self._config.tokenize_timeout_s} s"
            raise QueueUnavailableError("tokenize", cause, self._config.retry_after_s) from None
        finally:
            self._waiting.pop(call_id, None)

    @guard_async
    async def _send(self, call_id: str, payload: bytes) -> None:
        fields = {_REPLY: self._reply_key.encode(), _CALL: call_id.encode(), _PAYLOAD: payload}
        # Bounded: calls nobody answers (no tokenizer replica running) must not fill Redis.
        await self._redis.xadd(self._calls_key, fields, maxlen=CALL_STREAM_MAX_ENTRIES, approximate=True)  # type: ignore[arg-type]

    async def _read_forever(self) -> None:
        after: Any = b"0-0"  # the stream is this replica's alone: nothing in it predates us
        outage = Backoff()
        while not self._closed:
            try:
                reply: Any = await self._redis.xread({self._reply_key: after}, count=256, block=READ_BLOCK_MS)
            except Exception:  # never leave waiting calls without a reader; they time out meanwhile
                logger.warning("tokenizer replies unreadable; retrying", exc_info=True)
                await asyncio.sleep(outage.next_delay())
                continue
            outage.reset()
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    after = entry_id
                    waiting = self._waiting.get(codec.as_text(fields[_CALL]))
                    if waiting is not None and not waiting.done():
                        waiting.set_result(bytes(fields[_PAYLOAD]))

    async def aclose(self) -> None:
        # A cancelled blocking read may be retried by redis-py's own retries rather than end:
        # the flag ends the loop at its next turn (within READ_BLOCK_MS) whatever happens.
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait({self._reader}, timeout=READ_BLOCK_MS / 1000 + 1)
        with contextlib.suppress(Exception):
            await self._redis.delete(self._reply_key)
        await super().aclose()


class TokenizeCalls(AsyncRedisOwner):
    """A tokenizer replica's side: take calls, answer them, take over those of dead replicas."""

    def __init__(self, url: str, config: QueueConfig) -> None:
        self._config = config
        self._calls_key = QueueKeys(config.key_prefix).tokenize_calls
        self._redis = async_redis(url, decode_responses=False)

    @guard_async
    async def ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self._calls_key, TOKENIZER_GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if not is_existing_group(error):
                raise

    @guard_async
    async def take(self, consumer: str, max_count: int, block_ms: int) -> list[TokenizeCall]:
        """New calls, waiting up to ``block_ms`` for one."""
        streams: dict[Any, Any] = {self._calls_key: ">"}
        reply: Any = await self._redis.xreadgroup(
            TOKENIZER_GROUP, consumer, streams, count=max_count, block=block_ms
        )
        return await self._calls([entry for _, entries in reply or [] for entry in entries])

    @guard_async
    async def reclaim(self, consumer: str, max_count: int) -> list[TokenizeCall]:
        """Calls another replica took and has not answered for ``tokenize_reclaim_s``."""
        min_idle_ms = int(self._config.tokenize_reclaim_s * 1000)
        # [next id, entries] (Redis 6.2), plus the ids of deleted entries from Redis 7 on.
        reply: Any = await self._redis.xautoclaim(
            self._calls_key, TOKENIZER_GROUP, consumer, min_idle_ms, count=max_count
        )
        entries = reply[1]
        return await self._calls(entries)

    async def _calls(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[TokenizeCall]:
        """The entries as calls; one without the fields of a call (not written by a tokenline
        ingress) is dropped from the stream, so that no replica takes it again."""
        calls, malformed = [], []
        for entry_id, fields in entries:
            if fields and all(name in fields for name in (_REPLY, _CALL, _PAYLOAD)):
                calls.append(TokenizeCall(
                    codec.as_text(entry_id),
                    codec.as_text(fields[_REPLY]),
                    codec.as_text(fields[_CALL]),
                    bytes(fields[_PAYLOAD]),
                ))  # fmt: skip
            else:
                malformed.append(entry_id)
        if malformed:
            logger.warning("malformed tokenizer calls dropped", extra={"calls": len(malformed)})
            pipe = self._redis.pipeline(transaction=False)
            pipe.xack(self._calls_key, TOKENIZER_GROUP, *malformed)
            pipe.xdel(self._calls_key, *malformed)
            await pipe.execute()
        return calls

    @guard_async
    async def answer(self, calls: list[tuple[TokenizeCall, bytes]]) -> None:
        """Send each call's reply and drop the calls from the stream, in one round trip."""
        if not calls:
            return
        ttl_ms = int(self._config.tokenize_timeout_s * 1000) * 2  # a dead caller's stream goes away
        pipe = self._redis.pipeline(transaction=False)
        for call, payload in calls:
            fields = {_CALL: call.call_id.encode(), _PAYLOAD: payload}
            pipe.xadd(call.reply_to, fields, maxlen=REPLY_STREAM_MAX_ENTRIES, approximate=True)  # type: ignore[arg-type]
            pipe.pexpire(call.reply_to, ttl_ms)
        entry_ids = [call.entry_id for call, _ in calls]
        pipe.xack(self._calls_key, TOKENIZER_GROUP, *entry_ids)
        pipe.xdel(self._calls_key, *entry_ids)
        await pipe.execute()
