"""The claiming half of an engine's queue: take requests, hold them under lease, give them back.

Priority holds across the queue: each priority value has its own stream (a *band*, see
``keys``) with the consumer group ``engines``, and a claim is one script that walks the
bands with undelivered entries most urgent first. It takes a request only if its prompt fits
the KV blocks the engine says are free, looking at an entry before it delivers it, so a
replica never holds work another replica could run. Leases, reclaim, hand-back, dead-letter
and cancel work per entry, on whichever band holds it; callers name entries by ticket and
never see bands.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError
from redis.typing import EncodableT, KeyT, StreamIdT

from services.errors import InvalidParameterError
from services.messages import FinishReason, GenerationRequest, TokenChunk
from services.queue import codec
from services.queue.engine_redis import Command, EngineRedis, check_consumer, check_non_negative
from services.queue.group_errors import is_existing_group, is_missing_group
from services.queue.keys import ENGINE_GROUP, PRIORITIES, ModelKeys, split_ticket
from services.queue.outage import guard
from services.queue.scripts import LuaScript

logger = logging.getLogger(__name__)

_UNLIMITED = 2**31  # blocks: a claim without a KV budget


@dataclass(frozen=True)
class KvBudget:
    """The KV cache a claim may fill: blocks free for new prompts, their size, and the whole
    cache (a prompt larger than that fits no replica of the model and is taken to be failed)."""

    free_blocks: int
    block_size: int
    total_blocks: int

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


@dataclass(frozen=True)
class ClaimedRequest:
    """A request an engine now holds under lease. ``deliveries`` counts this hand-out;
    ``cancelled`` means the client cancelled it before the engine got it: finish it
    with ABORT instead of running it. ``reclaimed``: another engine held it before, so
    its output stream may already hold tokens to resume after. ``entry_id`` is the
    entry's ticket (see ``keys``)."""

    entry_id: str
    request: GenerationRequest
    deliveries: int
    cancelled: bool
    reclaimed: bool


@dataclass(frozen=True)
class _Delivered:
    """An entry a script handed to this replica, not yet decoded. ``cancelled``: None when the
    script did not look (a reclaim), so ``_admit`` asks Redis."""

    entry_id: str
    fields: codec.RawFields
    deliveries: int
    cancelled: bool | None = None


class EngineClaims(EngineRedis):
    """Claims, leases, reclaim and hand-back of one engine replica's requests."""

    @guard
    def claim(
        self, model: str, consumer: str, max_count: int, block_ms: int, kv: KvBudget | None = None
    ) -> list[ClaimedRequest]:
        """Take up to ``max_count`` new requests, most urgent first, waiting up to ``block_ms``
        (0: do not wait) for the next enqueue when none can be taken. With ``kv``, only requests
        whose prompts (plus the token to generate) fit ``kv.free_blocks`` together, stopping at
        the first that does not; one larger than ``kv.total_blocks`` is taken (it fits nowhere)."""
        check_non_negative("block_ms", block_ms)
        script_keys, args = self._claim_call(model, consumer, max_count, kv)  # checks the others
        if max_count == 0:
            return []
        script = self._scripts[LuaScript.CLAIM]
        bell, entries = script(keys=script_keys, args=args)
        if not entries and block_ms:
            # Sleep until the next enqueue rings the doorbell (or at once if one rang since the claim).
            streams: dict[KeyT, StreamIdT] = {self._keys.for_model(model).doorbell: bell}
            if self._redis.xread(streams, count=1, block=block_ms):
                bell, entries = script(keys=script_keys, args=args)
        return self._claimed(model, entries)

    def claim_command(self, model: str, consumer: str, max_count: int, kv: KvBudget | None = None) -> Command:
        """``claim`` without waiting, as one command to send in a pipeline; ``claimed_from``
        reads its reply."""
        script_keys, args = self._claim_call(model, consumer, max_count, kv)
        return ("EVALSHA", self._scripts[LuaScript.CLAIM].sha, len(script_keys), *script_keys, *args)

    @guard
    def claimed_from(self, model: str, reply: Any) -> list[ClaimedRequest]:
        """The requests a sent ``claim_command`` took. Raises an error reply (NoScriptError:
        Redis does not hold the script yet, or lost it in a restart; ``claim`` loads it)."""
        if isinstance(reply, Exception):
            raise reply
        _bell, entries = reply
        return self._claimed(model, entries)

    def _claim_call(
        self, model: str, consumer: str, max_count: int, kv: KvBudget | None
    ) -> tuple[list[KeyT], list[EncodableT]]:
        check_consumer(consumer)
        check_non_negative("max_count", max_count)
        keys = self._keys.for_model(model)
        kv = kv or KvBudget(_UNLIMITED, 1, _UNLIMITED)
        args: list[EncodableT] = [
            ENGINE_GROUP, consumer, max_count, kv.free_blocks, kv.block_size, kv.total_blocks, PRIORITIES[0]
        ]  # fmt: skip
        return [keys.ready, keys.doorbell, keys.cancelled, *keys.bands], args

    def _claimed(self, model: str, entries: Any) -> list[ClaimedRequest]:
        delivered = [
            _Delivered(codec.as_text(ticket), codec.pairs_to_fields(fields), 1, bool(flag))
            for ticket, fields, flag in entries
        ]
        return self._admit(model, self._keys.for_model(model), delivered, reclaimed=False)

    @guard
    def reclaim_expired(self, model: str, consumer: str, max_count: int) -> list[ClaimedRequest]:
        """Take over up to ``max_count`` requests whose holder let the lease run out.

        A request handed out more than ``max_deliveries`` times is dead-lettered instead:
        its output stream gets a final ERROR chunk and it is never handed out again.
        """
        check_consumer(consumer)
        check_non_negative("max_count", max_count)
        keys = self._keys.for_model(model)
        if max_count == 0:
            return []
        args: list[EncodableT] = [ENGINE_GROUP, consumer, self._config.lease_ms, max_count, PRIORITIES[0]]
        try:
            reply = self._scripts[LuaScript.RECLAIM](keys=list(keys.bands), args=args)
        except ResponseError as exc:
            if is_missing_group(exc):
                return []
            raise
        pending = [
            _Delivered(codec.as_text(ticket), codec.pairs_to_fields(fields), int(count))
            for ticket, count, fields in reply
        ]
        return self._admit(model, keys, pending, reclaimed=True)

    @guard
    def renew(self, model: str, consumer: str, entry_ids: Sequence[str]) -> set[str]:
        """Extend the lease of the given entries. Returns the ids this consumer no longer
        holds (another engine reclaimed them, or they were finished): stop working on those."""
        check_consumer(consumer)
        keys = self._keys.for_model(model)
        tickets, streams, pairs = _locate(keys, entry_ids)
        if not tickets:
            return set(entry_ids)
        try:
            held = self._scripts[LuaScript.RENEW](keys=streams, args=[ENGINE_GROUP, consumer, *pairs])
        except ResponseError as exc:
            if is_missing_group(exc):
                return set(entry_ids)
            raise
        return set(entry_ids) - {tickets[int(position) - 1] for position in held}

    @guard
    def hand_back(self, model: str, consumer: str, entry_ids: Sequence[str]) -> int:
        """Return held entries to the queue for another engine to reclaim right away (a replica
        that stops before its requests are done). Returns how many this consumer still held."""
        check_consumer(consumer)
        tickets, streams, pairs = _locate(self._keys.for_model(model), entry_ids)
        if not tickets:
            return 0
        args: list[EncodableT] = [ENGINE_GROUP, consumer, self._config.lease_ms, *pairs]
        return int(self._scripts[LuaScript.HAND_BACK](keys=streams, args=args))

    @guard
    def unfinished(self, model: str) -> int:
        """Accepted requests of the model not yet finished, waiting in any priority band or held
        by an engine (live, stopping or dead): the admission count, one O(1) read."""
        return int(self._redis.hlen(self._keys.for_model(model).active))

    @guard
    def ensure_group(self, model: str) -> None:
        """Create the model's priority-0 stream and consumer group if missing and mark it for the
        next claim to look at (safe to call any time; enqueue creates every other band's stream
        and group on first use)."""
        keys = self._keys.for_model(model)
        try:
            self._redis.xgroup_create(keys.requests, ENGINE_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if not is_existing_group(exc):
                raise
        # Entries accepted before the queue had bands sit in this stream unannounced: look once.
        self._redis.zadd(keys.ready, {"0": 0})

    def _admit(
        self,
        model: str,
        keys: ModelKeys,
        entries: Iterable[_Delivered],
        *,
        reclaimed: bool,
    ) -> list[ClaimedRequest]:
        """Decode delivered entries; dead-letter the over-delivered and the unreadable."""
        runnable: list[tuple[_Delivered, GenerationRequest]] = []
        for entry in entries:
            entry_id, fields, deliveries = entry.entry_id, entry.fields, entry.deliveries
            if deliveries > self._config.max_deliveries:
                reason = f"delivered {deliveries} times; at most {self._config.max_deliveries} allowed"
                self._dead_letter(model, keys, entry_id, codec.request_id_of(fields), reason, deliveries)
                continue
            try:
                runnable.append((entry, codec.decode_request(fields)))
            except InvalidParameterError as exc:
                reason = f"unreadable request entry: {exc}"
                self._dead_letter(model, keys, entry_id, codec.request_id_of(fields), reason, deliveries)
        unknown = [request.request_id for entry, request in runnable if entry.cancelled is None]
        found = self._redis.smismember(keys.cancelled, unknown) if unknown else []
        cancelled = {request_id for request_id, flag in zip(unknown, found, strict=True) if flag}
        return [
            ClaimedRequest(
                entry.entry_id,
                request,
                entry.deliveries,
                bool(entry.cancelled) or request.request_id in cancelled,
                reclaimed,
            )
            for entry, request in runnable
        ]

    def _dead_letter(
        self, model: str, keys: ModelKeys, entry_id: str, request_id: str | None, reason: str, deliveries: int
    ) -> None:
        config = self._config
        # Without a readable request id there is no output stream to end; the dead-letter
        # key stands in as the script's (untouched) output key.
        output_key = self._keys.output(request_id) if request_id else keys.dead
        final = TokenChunk(request_id or "", 0, finish_reason=FinishReason.ERROR, error=reason)
        priority, stream_id = split_ticket(entry_id) or (0, entry_id)  # tickets here came from a script
        self._scripts[LuaScript.DEAD_LETTER](
            keys=[keys.band(priority), keys.active, keys.cancelled, keys.dead, output_key],
            args=[
                ENGINE_GROUP,
                stream_id,
                request_id or "",
                config.output_ttl_ms,
                config.dead_letter_max_entries,
                reason,
                deliveries,
                entry_id,
                *codec.flatten(codec.encode_chunk(final)),
            ],
        )
        logger.error(
            "request dead-lettered",
            extra={"model": model, "request_id": request_id, "entry_id": entry_id, "deliveries": deliveries},
        )


def _locate(keys: ModelKeys, tickets: Sequence[str]) -> tuple[list[str], list[str], list[EncodableT]]:
    """The valid tickets, the band streams they are in, and (stream index, entry id) pairs for
    a script that takes those streams as KEYS. An invalid ticket names nothing held."""
    valid: list[str] = []
    streams: list[str] = []
    pairs: list[EncodableT] = []
    for ticket in tickets:
        located = split_ticket(ticket)
        if located is None:
            continue
        stream = keys.band(located[0])
        if stream not in streams:
            streams.append(stream)
        valid.append(ticket)
        pairs.extend((streams.index(stream) + 1, located[1]))
    return valid, streams, pairs
