"""Engine side of the request queue: claim, lease, write output, finish.

Synchronous on purpose: an engine replica's batching loop is a plain thread, and
each step makes exactly one round trip for all of its output and cancellations.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.exceptions import ResponseError
from redis.retry import Retry
from redis.typing import EncodableT, KeyT, StreamIdT

from services.errors import InvalidParameterError
from services.messages import FinishReason, GenerationRequest, TokenChunk
from services.queue import codec
from services.queue.config import QueueConfig
from services.queue.connection import RedisOwner
from services.queue.keys import ENGINE_GROUP, ModelKeys, QueueKeys
from services.queue.outage import guard
from services.queue.output_stream import collect_tokens
from services.queue.scripts import LuaScript

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimedRequest:
    """A request an engine now holds under lease. ``deliveries`` counts this hand-out;
    ``cancelled`` means the client cancelled it before the engine got it: finish it
    with ABORT instead of running it. ``reclaimed``: another engine held it before, so
    its output stream may already hold tokens to resume after."""

    entry_id: str
    request: GenerationRequest
    deliveries: int
    cancelled: bool
    reclaimed: bool


class EngineQueue(RedisOwner):
    """The queue as one engine replica sees it. Safe to share between threads: every call
    takes its own connection from redis-py's pool."""

    def __init__(self, url: str, config: QueueConfig | None = None) -> None:
        self._config = config or QueueConfig()
        self._keys = QueueKeys(self._config.key_prefix)
        # RESP2 and raw bytes: the shapes the codec reads (token ids are packed binary).
        # Few, short retries: the replica's loop waits out longer outages itself, beating its
        # health check meanwhile; seconds of retrying inside one call would look like a stall.
        retry = Retry(ExponentialBackoff(cap=0.2, base=0.01), retries=3)
        self._redis = redis.Redis.from_url(url, protocol=2, decode_responses=False, retry=retry)
        self._scripts: dict[LuaScript, Script] = {s: self._redis.register_script(s.value) for s in LuaScript}

    @guard
    def claim(self, model: str, consumer: str, max_count: int, block_ms: int) -> list[ClaimedRequest]:
        """Take up to ``max_count`` new requests, waiting up to ``block_ms`` (0: do not wait)."""
        _check_consumer(consumer)
        _check_non_negative("max_count", max_count)
        _check_non_negative("block_ms", block_ms)
        keys = self._keys.for_model(model)
        if max_count == 0:
            return []
        streams: dict[KeyT, StreamIdT] = {keys.requests: ">"}
        block = block_ms or None  # Redis reads BLOCK 0 as "forever"
        try:
            reply = self._redis.xreadgroup(ENGINE_GROUP, consumer, streams, count=max_count, block=block)
        except ResponseError as exc:
            if not _is_missing_group(exc):
                raise
            self.ensure_group(model)
            reply = self._redis.xreadgroup(ENGINE_GROUP, consumer, streams, count=max_count, block=block)
        delivered = [(entry_id, fields, 1) for entry_id, fields in codec.stream_entries(reply)]
        return self._admit(model, keys, delivered, reclaimed=False)

    @guard
    def reclaim_expired(self, model: str, consumer: str, max_count: int) -> list[ClaimedRequest]:
        """Take over up to ``max_count`` requests whose holder let the lease run out.

        A request handed out more than ``max_deliveries`` times is dead-lettered instead:
        its output stream gets a final ERROR chunk and it is never handed out again.
        """
        _check_consumer(consumer)
        _check_non_negative("max_count", max_count)
        keys = self._keys.for_model(model)
        if max_count == 0:
            return []
        args: list[EncodableT] = [ENGINE_GROUP, consumer, self._config.lease_ms, max_count]
        try:
            reply = self._scripts[LuaScript.RECLAIM](keys=[keys.requests], args=args)
        except ResponseError as exc:
            if _is_missing_group(exc):
                return []
            raise
        pending = [
            (codec.as_text(entry_id), codec.pairs_to_fields(fields), int(count))
            for entry_id, count, fields in reply
        ]
        return self._admit(model, keys, pending, reclaimed=True)

    @guard
    def renew(self, model: str, consumer: str, entry_ids: Sequence[str]) -> set[str]:
        """Extend the lease of the given entries. Returns the ids this consumer no longer
        holds (another engine reclaimed them, or they were finished): stop working on those."""
        _check_consumer(consumer)
        keys = self._keys.for_model(model)
        if not entry_ids:
            return set()
        try:
            held = self._scripts[LuaScript.RENEW](
                keys=[keys.requests], args=[ENGINE_GROUP, consumer, *entry_ids]
            )
        except ResponseError as exc:
            if _is_missing_group(exc):
                return set(entry_ids)
            raise
        return set(entry_ids) - {codec.as_text(entry_id) for entry_id in held}

    @guard
    def hand_back(self, model: str, consumer: str, entry_ids: Sequence[str]) -> int:
        """Return held entries to the queue for another engine to reclaim right away (a replica
        that stops before its requests are done). Returns how many this consumer still held."""
        _check_consumer(consumer)
        if not entry_ids:
            return 0
        keys = self._keys.for_model(model)
        args: list[EncodableT] = [ENGINE_GROUP, consumer, self._config.lease_ms, *entry_ids]
        return int(self._scripts[LuaScript.HAND_BACK](keys=[keys.requests], args=args))

    @guard
    def append(self, chunks: Sequence[TokenChunk]) -> None:
        """Write all chunks of one engine step in one round trip."""
        if not chunks:
            return
        pipe = self._redis.pipeline(transaction=False)
        self._queue_chunks(pipe, chunks)
        pipe.execute()

    @guard
    def append_and_poll_cancels(
        self,
        model: str,
        chunks: Sequence[TokenChunk],
        running_ids: Sequence[str],
        acknowledged: Mapping[str, str] | None = None,
    ) -> set[str]:
        """The per-step call of an engine, one round trip: append ``chunks``, then acknowledge
        the requests in ``acknowledged`` (request id -> entry id) whose final chunk is written
        (by this call or an earlier one) and free their admission slots, and return which of
        ``running_ids`` a client has cancelled."""
        keys = self._keys.for_model(model)
        pipe = self._redis.pipeline(transaction=False)
        self._queue_chunks(pipe, chunks)
        finish = self._scripts[LuaScript.FINISH]
        for request_id, entry_id in (acknowledged or {}).items():
            finish(
                keys=[keys.requests, keys.active, keys.cancelled],
                args=[ENGINE_GROUP, entry_id, request_id],
                client=pipe,
            )
        if running_ids:
            pipe.smismember(keys.cancelled, list(running_ids))
        replies = pipe.execute()
        return _members(running_ids, replies[-1]) if running_ids else set()

    @guard
    def cancelled(self, model: str, request_ids: Sequence[str]) -> set[str]:
        """Which of ``request_ids`` a client has cancelled (one round trip)."""
        keys = self._keys.for_model(model)
        if not request_ids:
            return set()
        return _members(request_ids, self._redis.smismember(keys.cancelled, list(request_ids)))

    @guard
    def finish(self, model: str, entry_id: str, request_id: str) -> bool:
        """Acknowledge a request whose final chunk is written and free its admission slot.

        Idempotent: returns True only for the call that freed the slot.
        """
        keys = self._keys.for_model(model)
        args = [ENGINE_GROUP, entry_id, request_id]
        released = self._scripts[LuaScript.FINISH](
            keys=[keys.requests, keys.active, keys.cancelled], args=args
        )
        return bool(released)

    @guard
    def read_output_tokens(self, request_id: str) -> tuple[list[int], bool]:
        """Tokens already in a request's output stream (overlaps collapsed) and whether it ended,
        so that an engine that reclaimed the request resumes instead of starting over."""
        entries = self._redis.xrange(self._keys.output(request_id))
        return collect_tokens(request_id, codec.decode_chunk_entries(request_id, entries))

    @guard
    def ensure_group(self, model: str) -> None:
        """Create the model's stream and consumer group if missing (safe to call any time)."""
        keys = self._keys.for_model(model)
        try:
            self._redis.xgroup_create(keys.requests, ENGINE_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _queue_chunks(self, pipe: Any, chunks: Iterable[TokenChunk]) -> None:
        for chunk in chunks:
            key = self._keys.output(chunk.request_id)
            pipe.xadd(key, codec.encode_chunk(chunk))
            if chunk.finish_reason is not None:
                pipe.pexpire(key, self._config.output_ttl_ms)

    def _admit(
        self,
        model: str,
        keys: ModelKeys,
        entries: Iterable[tuple[str, codec.RawFields, int]],
        *,
        reclaimed: bool,
    ) -> list[ClaimedRequest]:
        """Decode delivered entries; dead-letter the over-delivered and the unreadable."""
        runnable: list[tuple[str, GenerationRequest, int]] = []
        for entry_id, fields, deliveries in entries:
            if deliveries > self._config.max_deliveries:
                reason = f"delivered {deliveries} times; at most {self._config.max_deliveries} allowed"
                self._dead_letter(model, keys, entry_id, codec.request_id_of(fields), reason, deliveries)
                continue
            try:
                runnable.append((entry_id, codec.decode_request(fields), deliveries))
            except InvalidParameterError as exc:
                reason = f"unreadable request entry: {exc}"
                self._dead_letter(model, keys, entry_id, codec.request_id_of(fields), reason, deliveries)
        if not runnable:
            return []
        flags = self._redis.smismember(keys.cancelled, [request.request_id for _, request, _ in runnable])
        return [
            ClaimedRequest(entry_id, request, deliveries, bool(flag), reclaimed)
            for (entry_id, request, deliveries), flag in zip(runnable, flags, strict=True)
        ]

    def _dead_letter(
        self, model: str, keys: ModelKeys, entry_id: str, request_id: str | None, reason: str, deliveries: int
    ) -> None:
        config = self._config
        # Without a readable request id there is no output stream to end; the dead-letter
        # key stands in as the script's (untouched) output key.
        output_key = self._keys.output(request_id) if request_id else keys.dead
        final = TokenChunk(request_id or "", 0, finish_reason=FinishReason.ERROR, error=reason)
        self._scripts[LuaScript.DEAD_LETTER](
            keys=[keys.requests, keys.active, keys.cancelled, keys.dead, output_key],
            args=[
                ENGINE_GROUP,
                entry_id,
                request_id or "",
                config.output_ttl_ms,
                config.dead_letter_max_entries,
                reason,
                deliveries,
                *codec.flatten(codec.encode_chunk(final)),
            ],
        )
        logger.error(
            "request dead-lettered",
            extra={"model": model, "request_id": request_id, "entry_id": entry_id, "deliveries": deliveries},
        )


def _members(candidates: Sequence[str], flags: Sequence[int]) -> set[str]:
    return {candidate for candidate, flag in zip(candidates, flags, strict=True) if flag}


def _is_missing_group(exc: ResponseError) -> bool:
    # Raised directly or wrapped in a script error, so match anywhere in the message.
    return "NOGROUP" in str(exc)


def _check_consumer(consumer: str) -> None:
    if not isinstance(consumer, str) or not consumer:
        raise InvalidParameterError("consumer", consumer, "must be a non-empty string")


def _check_non_negative(field: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidParameterError(field, value, "must be an integer >= 0")
