"""The writing half of an engine's queue: each step's tokens, finished requests released, the
client's cancellations polled, all in one round trip."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.client import Pipeline
from redis.exceptions import NoScriptError

from services.messages import TokenChunk
from services.queue import codec
from services.queue.engine_redis import EngineRedis
from services.queue.keys import ENGINE_GROUP, ModelKeys, split_ticket
from services.queue.outage import guard
from services.queue.output_stream import collect_tokens
from services.queue.scripts import LuaScript


@dataclass(frozen=True)
class StepReply:
    """What the per-step write brings back. ``work_waiting``: some priority band may hold
    requests nobody claimed yet (the ready set is cleared lazily, so True can be stale; False
    is exact at the time of the write)."""

    cancelled: set[str]
    work_waiting: bool


class EngineOutput(EngineRedis):
    """An engine replica's writes: step output, finishes, cancellation polls, resume reads."""

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
    ) -> StepReply:
        """The per-step call of an engine, one round trip: append ``chunks``, then acknowledge
        the requests in ``acknowledged`` (request id -> entry id) whose final chunk is written
        (by this call or an earlier one) and free their admission slots; say which of
        ``running_ids`` a client has cancelled and whether any request waits to be claimed."""
        keys = self._keys.for_model(model)
        acknowledged = acknowledged or {}
        pipe = self._redis.pipeline(transaction=False)
        pipe.zcard(keys.ready)  # first reply: bands that may hold requests nobody claimed yet
        self._queue_chunks(pipe, chunks)
        self._queue_finishes(pipe, keys, acknowledged)
        if running_ids:
            pipe.smismember(keys.cancelled, list(running_ids))
        replies = pipe.execute(raise_on_error=False)
        errors = [reply for reply in replies if isinstance(reply, Exception)]
        if errors and all(isinstance(error, NoScriptError) for error in errors):
            # Redis lost its scripts (it restarted empty); the rest of the write went through.
            self._redis.script_load(LuaScript.FINISH.value)
            again = self._redis.pipeline(transaction=False)
            self._queue_finishes(again, keys, acknowledged)
            again.execute()
        elif errors:
            raise errors[0]
        cancelled = _members(running_ids, replies[-1]) if running_ids else set()
        return StepReply(cancelled, work_waiting=int(replies[0]) > 0)

    def _queue_finishes(self, pipe: Pipeline, keys: ModelKeys, acknowledged: Mapping[str, str]) -> None:
        # A bare EVALSHA: handed a registered Script, redis-py's pipeline first asks Redis whether
        # the script exists, one more round trip on every write that finishes a request.
        finish_sha = self._scripts[LuaScript.FINISH].sha
        for request_id, ticket in acknowledged.items():
            call = _finish_call(keys, request_id, ticket)
            if call is not None:
                finish_keys, finish_args = call
                pipe.evalsha(finish_sha, len(finish_keys), *finish_keys, *finish_args)

    def _queue_chunks(self, pipe: Any, chunks: Iterable[TokenChunk]) -> None:
        for chunk in chunks:
            key = self._keys.output(chunk.request_id)
            pipe.xadd(key, codec.encode_chunk(chunk))
            if chunk.finish_reason is not None:
                pipe.pexpire(key, self._config.output_ttl_ms)

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
        call = _finish_call(self._keys.for_model(model), request_id, entry_id)
        if call is None:
            return False
        finish_keys, finish_args = call
        return bool(self._scripts[LuaScript.FINISH](keys=finish_keys, args=finish_args))

    @guard
    def read_output_tokens(self, request_id: str) -> tuple[list[int], bool]:
        """Tokens already in a request's output stream (overlaps collapsed) and whether it ended,
        so that an engine that reclaimed the request resumes instead of starting over."""
        entries = self._redis.xrange(self._keys.output(request_id))
        return collect_tokens(request_id, codec.decode_chunk_entries(request_id, entries))


def _members(candidates: Sequence[str], flags: Sequence[int]) -> set[str]:
    return {candidate for candidate, flag in zip(candidates, flags, strict=True) if flag}


def _finish_call(keys: ModelKeys, request_id: str, ticket: str) -> tuple[list[str], list[str]] | None:
    """KEYS and ARGV of the FINISH script for one request, or None when the ticket names no
    entry (nothing holds it, nothing to release)."""
    located = split_ticket(ticket)
    if located is None:
        return None
    priority, stream_id = located
    return [keys.band(priority), keys.active, keys.cancelled], [ENGINE_GROUP, stream_id, request_id, ticket]
