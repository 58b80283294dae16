"""The queue as one detokenizer replica sees it: own requests, read tokens, write text.

Every accepted request has one entry in the assignment stream (written by the
enqueue script). A detokenizer replica takes entries through the consumer group
and so owns those requests; it renews its hold like an engine renews a lease. When
a replica dies its entries stay pending, and a live replica reclaims them after the
lease and rebuilds each request's state from its token stream.

Synchronous: the detokenizer's loop is a plain thread, and one loop turn makes one
blocking multi-stream read plus one pipelined write for every request it owns.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.commands.core import Script
from redis.exceptions import ResponseError
from redis.typing import EncodableT, KeyT, StreamIdT

from services.messages import StreamRequest, TextDelta, TokenChunk
from services.queue import codec
from services.queue.config import QueueConfig
from services.queue.connection import RedisOwner, loop_redis
from services.queue.group_errors import is_existing_group
from services.queue.keys import DETOKENIZER_GROUP, QueueKeys
from services.queue.outage import guard
from services.queue.scripts import LuaScript

logger = logging.getLogger(__name__)

MAX_ENTRIES_PER_STREAM = 256


@dataclass(frozen=True)
class Assignment:
    """A request this replica now renders. ``next_text_index``: output tokens whose text is
    already in the text stream (a request taken over from a dead replica); ``finished``:
    its text stream is complete, nothing is left to do but release it."""

    entry_id: str
    request: StreamRequest | None  # None when the request's metadata expired
    next_text_index: int = 0
    finished: bool = False


@dataclass(frozen=True)
class TokenRead:
    """What one blocking read brought: new chunks per request (with the entry id to continue
    after) and whether new assignments may be waiting."""

    chunks: dict[str, list[tuple[str, TokenChunk]]]
    assignments_waiting: bool


class DetokenizerQueue(RedisOwner):
    def __init__(self, url: str, config: QueueConfig | None = None) -> None:
        self._config = config or QueueConfig()
        self._keys = QueueKeys(self._config.key_prefix)
        self._redis = loop_redis(url)  # RESP2, raw bytes: the shapes the codec reads
        self._scripts: dict[LuaScript, Script] = {s: self._redis.register_script(s.value) for s in LuaScript}
        self._assignments = self._keys.detokenizer_assignments

    @guard
    def ensure_group(self) -> None:
        try:
            self._redis.xgroup_create(self._assignments, DETOKENIZER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if not is_existing_group(exc):
                raise

    @guard
    def take_new(self, consumer: str, max_count: int) -> tuple[list[Assignment], str]:
        """New assignments for this replica, and the id of the newest assignment entry at that
        moment (atomically): a read that waits for entries after it misses none."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.xreadgroup(DETOKENIZER_GROUP, consumer, {self._assignments: ">"}, count=max_count)
        pipe.xrevrange(self._assignments, count=1)
        taken, newest = pipe.execute()
        last_id = codec.as_text(newest[0][0]) if newest else "0-0"
        entries = [(entry_id, fields) for entry_id, fields in codec.stream_entries(taken)]
        return self._assign(entries, reclaimed=False), last_id

    @guard
    def reclaim_expired(self, consumer: str, max_count: int) -> list[Assignment]:
        """Take over assignments whose holder stopped renewing them (a dead replica)."""
        # The assignment stream is one band (priority 0) as the engines' scripts see it.
        args: list[EncodableT] = [DETOKENIZER_GROUP, consumer, self._config.lease_ms, max_count, 0]
        reply = self._scripts[LuaScript.RECLAIM](keys=[self._assignments], args=args)
        entries = [(codec.as_text(entry_id), codec.pairs_to_fields(fields)) for entry_id, _, fields in reply]
        return self._assign(entries, reclaimed=True)

    @guard
    def renew(self, consumer: str, entry_ids: Sequence[str]) -> set[str]:
        """Renew the hold on these entries; returns those this replica no longer holds."""
        if not entry_ids:
            return set()
        positions = self._scripts[LuaScript.RENEW](
            keys=[self._assignments], args=[DETOKENIZER_GROUP, consumer, *_in_first_key(entry_ids)]
        )
        return set(entry_ids) - {entry_ids[int(position) - 1] for position in positions}

    @guard
    def hand_back(self, consumer: str, entry_ids: Sequence[str]) -> int:
        """Make held entries reclaimable at once (a replica that stops cleanly)."""
        if not entry_ids:
            return 0
        args: list[EncodableT] = [
            DETOKENIZER_GROUP,
            consumer,
            self._config.lease_ms,
            *_in_first_key(entry_ids),
        ]
        return int(self._scripts[LuaScript.HAND_BACK](keys=[self._assignments], args=args))

    @guard
    def read(self, cursors: Mapping[str, str], assignments_after: str, block_ms: int) -> TokenRead:
        """One blocking read over the token streams of every owned request (request id ->
        last entry id consumed) and the assignment stream; returns at the first new entry."""
        streams: dict[KeyT, StreamIdT] = {self._keys.output(rid): entry for rid, entry in cursors.items()}
        streams[self._assignments] = assignments_after
        reply = self._redis.xread(streams, count=MAX_ENTRIES_PER_STREAM, block=block_ms or None)
        by_key = codec.streams_by_key(reply)
        waiting = bool(by_key.pop(self._assignments, None))
        cut = len(self._keys.output_prefix)
        chunks = {
            key[cut:]: codec.decode_chunk_entries(key[cut:], entries) for key, entries in by_key.items()
        }
        return TokenRead(chunks, waiting)

    @guard
    def write(self, deltas: Sequence[TextDelta], released: Sequence[str]) -> None:
        """Append text entries and release finished assignments, in one round trip."""
        if not deltas and not released:
            return
        pipe: Any = self._redis.pipeline(transaction=False)
        for delta in deltas:
            key = self._keys.text(delta.request_id)
            pipe.xadd(key, codec.encode_text_delta(delta))
            if delta.finish_reason is not None:
                pipe.pexpire(key, self._config.output_ttl_ms)
        if released:
            pipe.xack(self._assignments, DETOKENIZER_GROUP, *released)
            pipe.xdel(self._assignments, *released)
        pipe.execute()

    @guard
    def cancel(self, model: str, request_id: str) -> None:
        """Ask the engine to stop a request whose text ended at a stop string."""
        keys = self._keys.for_model(model)
        self._scripts[LuaScript.CANCEL](keys=[keys.active, keys.cancelled], args=[request_id])

    def _assign(self, entries: Sequence[tuple[str, codec.RawFields]], *, reclaimed: bool) -> list[Assignment]:
        """Entries -> assignments: each with its request's metadata and, for a reclaimed one,
        how far its text stream already got (one round trip for all)."""
        ids = [codec.request_id_of(fields) for _, fields in entries]
        known = [rid for rid in ids if rid]
        if not known:
            return [Assignment(entry_id, None) for entry_id, _ in entries]
        pipe = self._redis.pipeline(transaction=False)
        for rid in known:
            pipe.get(self._keys.stream_metadata(rid))
            pipe.xrevrange(self._keys.text(rid), count=1)
        replies = iter(pipe.execute())
        progress = {rid: (next(replies), next(replies)) for rid in known}
        assignments = []
        for (entry_id, _), request_id in zip(entries, ids, strict=True):
            blob, last_text = progress.get(request_id or "", (None, []))
            request = codec.decode_stream_request(request_id, blob) if request_id and blob else None
            next_index, finished = 0, False
            if last_text and request_id and reclaimed:
                delta = codec.decode_text_delta(request_id, last_text[0][1])
                next_index = delta.token_index + len(delta.token_ids)
                finished = delta.finish_reason is not None
            assignments.append(Assignment(entry_id, request, next_index, finished))
        return assignments


def _in_first_key(entry_ids: Sequence[str]) -> list[EncodableT]:
    """(key index, entry id) argument pairs for scripts that span several streams: all here
    live in the assignment stream, key 1."""
    return [part for entry_id in entry_ids for part in (1, entry_id)]
