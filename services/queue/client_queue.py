"""Client side of the request queue: enqueue, cancel, read output.

Asynchronous: the ingress and detokenizer deployments serve many streams on one
event loop, and a blocked output read must not hold up the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from redis.commands.core import AsyncScript
from redis.typing import KeyT, StreamIdT

from services.errors import InvalidParameterError, QueueFullError
from services.messages import GenerationRequest, StreamRequest, TextDelta, TokenChunk
from services.queue import codec
from services.queue.config import QueueConfig
from services.queue.connection import AsyncRedisOwner, async_redis
from services.queue.keys import DETOKENIZER_GROUP, ENGINE_GROUP, QueueKeys, check_request_id
from services.queue.outage import guard_async
from services.queue.output_stream import STREAM_START, OutputCursor, advance
from services.queue.scripts import LuaScript

logger = logging.getLogger(__name__)

DEFAULT_READ_ENTRIES = 256
# How long a reading of a model's queue under half its bound stands in for the early admission
# check (``ensure_room``). Enqueue is the gate that counts; the early check only spares the
# tokenizer a request that enqueue would refuse, so under light load it need not ask each time.
# A second, not less: a replica with a request every few hundred milliseconds would otherwise
# read on every request (~1 ms of a lone request's time to first token on the 2-core test
# machine). What a longer trust costs: when other replicas fill the queue from under half to
# full within it, this replica tokenizes up to a second of requests that enqueue then refuses
# (each refusal refreshes the reading, and from half the bound on it reads every time).
TRUSTED_DEPTH_S = 1.0


@dataclass(frozen=True)
class EnqueueResult:
    """An accepted request. ``duplicate``: the request id was already accepted earlier,
    this call added no work; its output stream is the one to read."""

    request_id: str
    entry_id: str
    duplicate: bool


class QueueClient(AsyncRedisOwner):
    """The queue as the ingress and the detokenizer see it."""

    def __init__(self, url: str, config: QueueConfig | None = None) -> None:
        self._config = config or QueueConfig()
        self._keys = QueueKeys(self._config.key_prefix)
        # RESP2 and raw bytes: the shapes the codec reads (token ids are packed binary).
        self._redis = async_redis(url, decode_responses=False)
        self._scripts: dict[LuaScript, AsyncScript] = {
            script: self._redis.register_script(script.value) for script in LuaScript
        }
        self._depths: dict[str, tuple[int, float]] = {}  # model -> (unfinished, monotonic time read)

    @guard_async
    async def enqueue(self, request: GenerationRequest) -> EnqueueResult:
        """Durably accept a request, or raise QueueFullError with a retry hint.

        Safe to retry after a connection error: a repeat of an accepted request id
        comes back as a duplicate and adds no work. The request joins the stream of its
        priority (InvalidParameterError naming ``priority`` outside the supported range).
        """
        keys = self._keys.for_model(request.model)
        config = self._config
        reply = await self._scripts[LuaScript.ENQUEUE](
            keys=[
                keys.band(request.priority),
                keys.active,
                self._keys.idempotency(request.request_id),
                self._keys.stream_metadata(request.request_id),
                keys.ready,
                keys.doorbell,
                self._keys.detokenizer_assignments,
            ],
            args=[
                request.request_id,
                config.max_queue_depth,
                config.idempotency_ttl_ms,
                ENGINE_GROUP,
                codec.encode_stream_request(request),
                request.priority,
                DETOKENIZER_GROUP,
                *codec.flatten(codec.encode_request(request)),
            ],
        )
        status, value = codec.as_text(reply[0]), reply[1]
        if status != "duplicate":
            self._saw_depth(request.model, int(reply[-1]))
        if status == "full":
            logger.info(
                "enqueue refused: queue full",
                extra={"model": request.model, "request_id": request.request_id, "depth": int(value)},
            )
            raise QueueFullError(request.model, int(value), config.max_queue_depth, config.retry_after_s)
        return EnqueueResult(request.request_id, codec.as_text(value), duplicate=status == "duplicate")

    @guard_async
    async def cancel(self, model: str, request_id: str) -> bool:
        """Ask the engine holding the request (or the next one to claim it) to end it with ABORT.

        Returns False when the request is not active (unknown or already finished).
        """
        keys = self._keys.for_model(model)
        check_request_id(request_id)
        marked = await self._scripts[LuaScript.CANCEL](keys=[keys.active, keys.cancelled], args=[request_id])
        return bool(marked)

    @guard_async
    async def read(
        self, cursor: OutputCursor, block_ms: int, max_entries: int = DEFAULT_READ_ENTRIES
    ) -> tuple[list[TokenChunk], OutputCursor]:
        """New output of a request after ``cursor``, waiting up to ``block_ms`` (0: do not wait).

        Every returned chunk starts at the previous one's end, from ``cursor.next_index``
        on, so a reader never sees an index twice even when two engines wrote overlapping
        ranges. Start with ``OutputCursor(request_id)`` (or ``next_index`` set to the
        tokens already seen) and pass back the cursor each call returns; once
        ``cursor.finished`` is set nothing more will come.
        """
        if isinstance(block_ms, bool) or not isinstance(block_ms, int) or block_ms < 0:
            raise InvalidParameterError("block_ms", block_ms, "must be an integer >= 0")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise InvalidParameterError("max_entries", max_entries, "must be an integer >= 1")
        if cursor.finished:
            return [], cursor
        key = self._keys.output(cursor.request_id)
        reply = await self._redis.xread({key: cursor.entry_id}, count=max_entries, block=block_ms or None)
        entries = codec.decode_chunk_entries(cursor.request_id, codec.stream_entries(reply))
        return advance(cursor, entries)

    @guard_async
    async def read_texts(
        self, cursors: Mapping[str, str], wake_key: str, wake_after: str, block_ms: int
    ) -> tuple[dict[str, list[tuple[str, TextDelta]]], str]:
        """One blocking read over the text streams of many requests (request id -> last entry
        id consumed) and a wake-up stream; returns at the first new entry in any of them, with
        the id of the newest wake-up seen."""
        streams: dict[KeyT, StreamIdT] = {self._keys.text(rid): entry for rid, entry in cursors.items()}
        streams[wake_key] = wake_after
        reply = await self._redis.xread(streams, count=DEFAULT_READ_ENTRIES, block=block_ms or None)
        by_key = codec.streams_by_key(reply)
        wakes = by_key.pop(wake_key, None)
        cut = len(self._keys.text_prefix)
        texts = {
            key[cut:]: [
                (entry_id, codec.decode_text_delta(key[cut:], fields)) for entry_id, fields in entries
            ]
            for key, entries in by_key.items()
        }
        return texts, wakes[-1][0] if wakes else wake_after

    @guard_async
    async def read_text_range(self, request_id: str, last_entry_id: str) -> list[TextDelta]:
        """A request's text entries from the start up to ``last_entry_id`` included."""
        if last_entry_id == STREAM_START:
            return []
        entries = await self._redis.xrange(self._keys.text(request_id), "-", last_entry_id)
        found = codec.stream_entries([("", entries)])
        return [codec.decode_text_delta(request_id, fields) for _, fields in found]

    @guard_async
    async def wake(self, wake_key: str) -> None:
        """Interrupt the blocking read that follows ``wake_key`` (a new call joined it)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(wake_key, {"w": b"1"}, maxlen=1, approximate=False)
        pipe.pexpire(wake_key, self._config.output_ttl_ms)
        await pipe.execute()

    @guard_async
    async def stream_request(self, request_id: str) -> StreamRequest | None:
        """How to follow an accepted request's output (model, stop strings), or None if unknown."""
        blob = await self._redis.get(self._keys.stream_metadata(request_id))
        return None if blob is None else codec.decode_stream_request(request_id, blob)

    async def ensure_room(self, model: str) -> None:
        """Raise QueueFullError now if the model's queue is at its bound: a cheap early refusal
        for an overloaded ingress. ``enqueue`` remains the gate that counts.

        No round trip while this client's last reading (its own enqueues report the depth
        too) is under half the bound and younger than ``TRUSTED_DEPTH_S``."""
        config = self._config
        depth, read_at = self._depths.get(model, (config.max_queue_depth, 0.0))
        if depth < config.max_queue_depth // 2 and time.monotonic() - read_at < TRUSTED_DEPTH_S:
            return
        depth = await self.depth(model)
        if depth >= config.max_queue_depth:
            raise QueueFullError(model, depth, config.max_queue_depth, config.retry_after_s)

    @guard_async
    async def depth(self, model: str) -> int:
        """Accepted-but-unfinished requests of ``model`` (what admission compares to the bound)."""
        depth = int(await self._redis.hlen(self._keys.for_model(model).active))
        self._saw_depth(model, depth)
        return depth

    def _saw_depth(self, model: str, depth: int) -> None:
        self._depths[model] = (depth, time.monotonic())

    @guard_async
    async def exists(self, request_id: str) -> bool:
        """Whether the request id is known: still remembered for idempotency, or its output is retained."""
        keys = (self._keys.idempotency(request_id), self._keys.output(request_id))
        return int(await self._redis.exists(*keys)) > 0
