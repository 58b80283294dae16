"""The detokenizer stage: one loop per replica renders the text of every request it owns.

Each turn: take new assignments (and, now and then, renew the hold on owned ones and
reclaim those of dead replicas), make one blocking read over the token streams of
all owned requests plus the assignment stream, render what arrived into at most one
delta per request, and write all deltas in one pipeline. Nothing here calls Ray:
tokens come from Redis and text goes back to Redis, batched per read.

Text that was rendered but not yet written waits in an outbox across a Redis outage,
so a delta is never lost and never written twice out of order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from services.detokenizer.follower import RequestText
from services.detokenizer.incremental import TokenDecoder
from services.detokenizer.token_texts import TokenTexts
from services.errors import QueueUnavailableError
from services.messages import FinishReason, TextDelta, TokenChunk
from services.queue.detokenizer_queue import Assignment, DetokenizerQueue
from services.queue.output_stream import OutputCursor, advance

logger = logging.getLogger(__name__)

MAX_READ_BLOCK_MS = 1000
MAX_ASSIGNMENTS_PER_TURN = 256


@dataclass
class _Owned:
    entry_id: str
    text: RequestText
    cursor: OutputCursor


class DetokenizerStage:
    """Owns requests through the assignment stream; call ``turn`` in a loop."""

    def __init__(
        self,
        tokenizers: Mapping[str, TokenDecoder],
        queue: DetokenizerQueue,
        consumer: str,
        lease_s: float,
    ) -> None:
        self._tokenizers = tokenizers
        # One cache per model, made on first use: variants published while we run join later.
        self._token_texts: dict[str, TokenTexts] = {}
        self._queue = queue
        self.consumer = consumer
        self._renew_every_s = lease_s / 3
        self._reclaim_every_s = lease_s / 4
        self._owned: dict[str, _Owned] = {}
        self._assignments_after = "0-0"
        self._assignments_waiting = True
        self._next_renew = self._next_reclaim = time.monotonic()
        self._outbox: list[TextDelta] = []
        self._release: list[str] = []
        self._stops: list[tuple[str, str]] = []  # (model, request id) to cancel in the engine

    @property
    def owned_request_ids(self) -> tuple[str, ...]:
        return tuple(self._owned)

    def turn(self) -> None:
        """One loop turn. Any queue call may raise QueueUnavailableError; the state stays
        consistent and the next turn starts by writing what is still unwritten."""
        self._flush()
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._adopt(self._queue.reclaim_expired(self.consumer, MAX_ASSIGNMENTS_PER_TURN))
            self._next_reclaim = now + self._reclaim_every_s
        if now >= self._next_renew:
            self._renew()
            self._next_renew = now + self._renew_every_s
        if self._assignments_waiting:
            taken, self._assignments_after = self._queue.take_new(self.consumer, MAX_ASSIGNMENTS_PER_TURN)
            self._adopt(taken)
            self._assignments_waiting = len(taken) == MAX_ASSIGNMENTS_PER_TURN
        wait_s = min(self._next_renew, self._next_reclaim) - time.monotonic()
        block_ms = 0 if self._assignments_waiting else max(1, min(MAX_READ_BLOCK_MS, int(wait_s * 1000)))
        cursors = {rid: owned.cursor.entry_id for rid, owned in self._owned.items()}
        read = self._queue.read(cursors, self._assignments_after, block_ms)
        self._assignments_waiting = self._assignments_waiting or read.assignments_waiting
        for request_id, entries in read.chunks.items():
            try:
                self._render(request_id, entries)
            except QueueUnavailableError:
                raise
            except Exception as error:  # one bad request must not stop the others
                self._fail(request_id, error)
        self._flush()

    def hand_back(self) -> int:
        """Give every owned request to another replica at once (a clean stop)."""
        self._flush()
        handed = self._queue.hand_back(self.consumer, [owned.entry_id for owned in self._owned.values()])
        self._owned.clear()
        return handed

    def _render(self, request_id: str, entries: list[tuple[str, TokenChunk]]) -> None:
        owned = self._owned.get(request_id)
        if owned is None:  # dropped in this turn (lease lost)
            return
        chunks, owned.cursor = advance(owned.cursor, entries)
        delta = owned.text.render(chunks)
        if delta is None:
            return
        self._outbox.append(delta)
        if owned.text.finished:
            self._release.append(owned.entry_id)
            del self._owned[request_id]
            if delta.matched_stop:
                self._stops.append((owned.text.request.model, request_id))

    def _flush(self) -> None:
        if self._outbox or self._release:
            self._queue.write(self._outbox, self._release)
            self._outbox, self._release = [], []
        while self._stops:
            model, request_id = self._stops[-1]
            self._queue.cancel(model, request_id)  # the client's text is complete; stop the engine
            self._stops.pop()

    def _fail(self, request_id: str, error: Exception) -> None:
        """End one request with an error the client sees (ABORTED) and let the others go on:
        otherwise a request that cannot be rendered would stop this replica's loop, and then
        every replica that takes it over, again and again."""
        logger.exception("detokenizing a request failed", extra={"request_id": request_id})
        owned = self._owned.pop(request_id, None)
        if owned is not None:
            self._release.append(owned.entry_id)
        failed = f"detokenizer: {type(error).__name__}"
        self._outbox.append(TextDelta(request_id, finish_reason=FinishReason.ERROR, error=failed))

    def _adopt(self, assignments: list[Assignment]) -> None:
        for assignment in assignments:
            try:
                self._adopt_one(assignment)
            except QueueUnavailableError:
                raise
            except Exception as error:  # see _fail
                if assignment.request is None:
                    raise
                self._release.append(assignment.entry_id)
                self._fail(assignment.request.request_id, error)

    def _adopt_one(self, assignment: Assignment) -> None:
        request = assignment.request
        tokenizer = self._tokenizers.get(request.model) if request is not None else None
        if request is None or tokenizer is None or assignment.finished:
            if request is not None and tokenizer is None:
                self._outbox.append(_unknown_model(request.request_id))
            self._release.append(assignment.entry_id)
            return
        if request.request_id in self._owned:
            return
        token_texts = self._token_texts.get(request.model)
        if token_texts is None:
            token_texts = self._token_texts[request.model] = TokenTexts(tokenizer)
        text = RequestText(tokenizer, request, assignment.next_text_index, token_texts)
        self._owned[request.request_id] = _Owned(assignment.entry_id, text, OutputCursor(request.request_id))
        if assignment.next_text_index:
            logger.info(
                "request taken over",
                extra={"request_id": request.request_id, "text_tokens": assignment.next_text_index},
            )

    def _renew(self) -> None:
        entry_to_request = {owned.entry_id: rid for rid, owned in self._owned.items()}
        for entry_id in self._queue.renew(self.consumer, list(entry_to_request)):
            request_id = entry_to_request[entry_id]
            logger.warning("detokenizer lost a request to another replica", extra={"request_id": request_id})
            self._owned.pop(request_id, None)


def _unknown_model(request_id: str) -> TextDelta:
    """A request for a model this replica has no tokenizer for (a config mismatch mid-rollout)."""
    return TextDelta(
        request_id, finish_reason=FinishReason.ERROR, error="no tokenizer for the request's model"
    )
