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
from services.queue.engine_redis import Command, EngineRedis
from services.queue.keys import ENGINE_GROUP, ModelKeys, split_ticket
from services.queue.outage import guard
from services.queue.output_stream import collect_tokens
from services.queue.scripts import LuaScript


@dataclass(frozen=True)
class StepWrite:
    """One step's write as Redis commands, in the order they are sent: the chunks, the
    acknowledgements (``finishes``) and, when ``polled`` is not empty, the cancellation poll
    last."""

    commands: list[Command]
    finishes: slice
    polled: tuple[str, ...]


@dataclass(frozen=True)
class StepReply:
    """What the per-step write brings back: which of the polled requests a client cancelled."""

    cancelled: set[str]


class EngineOutput(EngineRedis):
    """An engine replica's writes: step output, finishes, cancellation polls, resume reads."""

    @guard
    def append(self, chunks: Sequence[TokenChunk]) -> None:
        """Write all chunks of one engine step in one round trip."""
        if not chunks:
            return
        self._pipeline_of(self._chunk_commands(chunks)).execute()

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
        ``running_ids`` a client has cancelled. The step writer sends the same commands
        (``step_write``) without waiting for their replies."""
        write = self.step_write(model, chunks, running_ids, acknowledged or {})
        return self.step_reply(write, self._pipeline_of(write.commands).execute(raise_on_error=False))

    def step_write(
        self,
        model: str,
        chunks: Sequence[TokenChunk],
        running_ids: Sequence[str],
        acknowledged: Mapping[str, str],
    ) -> StepWrite:
        """The commands of one step's write (see ``append_and_poll_cancels``), in order."""
        keys = self._keys.for_model(model)
        commands = self._chunk_commands(chunks)
        first_finish = len(commands)
        commands.extend(self._finish_commands(keys, acknowledged))
        finishes = slice(first_finish, len(commands))
        if running_ids:
            commands.append(("SMISMEMBER", keys.cancelled, *running_ids))
        return StepWrite(commands, finishes, tuple(running_ids))

    @guard
    def step_reply(self, write: StepWrite, replies: Sequence[Any]) -> StepReply:
        """Read the replies to ``write.commands`` (an error reply as the exception). Raises the
        first error, but for scripts Redis lost (it restarted empty): those run again here."""
        errors = [reply for reply in replies if isinstance(reply, Exception)]
        if errors and all(isinstance(error, NoScriptError) for error in errors):
            # The rest of the write went through; only the finishes need the script back.
            self._redis.script_load(LuaScript.FINISH.value)
            self._pipeline_of(write.commands[write.finishes]).execute()
        elif errors:
            raise errors[0]
        return StepReply(_members(write.polled, replies[-1]) if write.polled else set())

    def _pipeline_of(self, commands: Iterable[Command]) -> Pipeline:
        pipe = self._redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        return pipe

    def _chunk_commands(self, chunks: Iterable[TokenChunk]) -> list[Command]:
        commands: list[Command] = []
        for chunk in chunks:
            key = self._keys.output(chunk.request_id)
            commands.append(("XADD", key, "*", *codec.flatten(codec.encode_chunk(chunk))))
            if chunk.finish_reason is not None:
                commands.append(("PEXPIRE", key, self._config.output_ttl_ms))
        return commands

    def _finish_commands(self, keys: ModelKeys, acknowledged: Mapping[str, str]) -> list[Command]:
        # A bare EVALSHA: handed a registered Script, redis-py's pipeline first asks Redis whether
        # the script exists, one more round trip on every write that finishes a request.
        finish_sha = self._scripts[LuaScript.FINISH].sha
        commands: list[Command] = []
        for request_id, ticket in acknowledged.items():
            call = _finish_call(keys, request_id, ticket)
            if call is not None:
                finish_keys, finish_args = call
                commands.append(("EVALSHA", finish_sha, len(finish_keys), *finish_keys, *finish_args))
        return commands

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
