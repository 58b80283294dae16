"""What an engine replica holds: the requests it claimed, the output it has not handed to the
step writer yet, and the acknowledgements a failed write left over.

The replica's loop decides when to write; this keeps the books in between, so that a write
that fails puts back exactly what it carried and nothing produced is lost or sent twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.engine.outputs import RequestOutput
from services.messages import FinishReason, TokenChunk, Usage


@dataclass
class HeldRequest:
    entry_id: str  # the queue entry's ticket: what acknowledging or handing back names
    next_index: int  # output index of the next token this replica will write
    num_prompt_tokens: int


@dataclass(frozen=True)
class PendingWrite:
    """What the next step write carries: ``acknowledged`` maps request id -> entry id for
    requests whose final chunk it writes (or an earlier write wrote); ``running``: the held
    requests still going, whose cancellations it polls."""

    chunks: list[TokenChunk]
    acknowledged: dict[str, str]
    running: list[str]


class Holdings:
    def __init__(self) -> None:
        self.held: dict[str, HeldRequest] = {}
        self._outbox: list[TokenChunk] = []  # produced, not yet handed to the writer
        self._unacknowledged: dict[str, str] = {}  # request id -> entry id: output complete, not acked

    @property
    def owes_redis(self) -> bool:
        """Output or acknowledgements wait to be written (left by an outage, or a reclaimed
        request that had already finished)."""
        return bool(self._outbox or self._unacknowledged)

    def hold(self, request_id: str, entry_id: str, num_prompt_tokens: int, next_index: int = 0) -> None:
        self.held[request_id] = HeldRequest(entry_id, next_index, num_prompt_tokens)

    def record(self, outputs: list[RequestOutput]) -> int:
        """Queue the new tokens of held requests for the next write; returns how many."""
        produced = 0
        for out in outputs:
            held = self.held.get(out.request_id)
            if held is None:  # aborted after the step began (lease lost)
                continue
            held.next_index = out.end_index
            chunk = out.token_chunk()
            self._outbox.append(chunk)
            produced += len(chunk.token_ids)
        return produced

    def end(self, request_id: str, reason: FinishReason, error: str = "") -> None:
        """Queue a final chunk for a held request the engine did not finish by itself; the next
        write carries it and releases the request."""
        held = self.held[request_id]
        usage = Usage(held.num_prompt_tokens, held.next_index, 0)
        self._outbox.append(TokenChunk(request_id, held.next_index, (), reason, usage, error))

    def drop(self, request_id: str) -> None:
        """Forget a request whose lease another replica took over: it is not ours to finish."""
        self.held.pop(request_id, None)

    def finished_elsewhere(self, request_id: str, entry_id: str) -> None:
        """A reclaimed request whose output stream already ends: acknowledge it, run nothing."""
        self._unacknowledged[request_id] = entry_id

    def take_write(self, poll_cancels: bool) -> PendingWrite | None:
        """Everything the next write carries (the outbox empties into it), or None when there
        is nothing to write, acknowledge or poll."""
        finishing = {c.request_id for c in self._outbox if c.finish_reason is not None}
        acknowledged = dict(self._unacknowledged)
        acknowledged.update((rid, self.held[rid].entry_id) for rid in finishing if rid in self.held)
        running = [rid for rid in self.held if rid not in finishing] if poll_cancels else []
        if not (self._outbox or acknowledged or running):
            return None
        chunks, self._outbox = self._outbox, []
        return PendingWrite(chunks, acknowledged, running)

    def written(self, acknowledged: dict[str, str]) -> None:
        """A write counted: its acknowledged requests are released."""
        for request_id in acknowledged:
            self.held.pop(request_id, None)
            self._unacknowledged.pop(request_id, None)

    def not_written(self, chunks: list[TokenChunk], acknowledged: dict[str, str]) -> None:
        """A write failed: its chunks go back to the front of the outbox, in order, and its
        acknowledgements wait for the next write."""
        self._outbox[:0] = chunks
        self._unacknowledged.update(acknowledged)
