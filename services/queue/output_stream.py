"""Turning an output stream into a gap-free, duplicate-free token sequence.

A request's output stream may hold overlapping token ranges: after a lease runs
out, a new engine resumes from the tokens it finds while the old one (a zombie
that had only stalled) may still write. Entries carry their start index, so the
reader keeps, for every index, the first token written there and drops the rest.
The engine's resume and the client's read go through the same ``advance``, so both
see the same sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace

from services.messages import TokenChunk

logger = logging.getLogger(__name__)

STREAM_START = "0-0"


@dataclass(frozen=True)
class OutputCursor:
    """Where a reader of one output stream stands.

    ``entry_id`` is the last stream entry consumed; ``next_index`` the first output
    token index not yet delivered; ``finished`` is set once the final chunk was delivered.
    """

    request_id: str
    entry_id: str = STREAM_START
    next_index: int = 0
    finished: bool = False


def advance(
    cursor: OutputCursor, entries: Iterable[tuple[str, TokenChunk]]
) -> tuple[list[TokenChunk], OutputCursor]:
    """The new part of ``entries`` (in stream order) for a reader at ``cursor``, and its next cursor.

    Delivered chunks start exactly at the reader's next index; nothing after the first
    final chunk is delivered.
    """
    delivered: list[TokenChunk] = []
    last_entry_id, next_index, finished = cursor.entry_id, cursor.next_index, cursor.finished
    for entry_id, chunk in entries:
        last_entry_id = entry_id
        if finished:
            continue
        fresh = _unseen_part(chunk, next_index)
        if fresh is None:
            continue
        delivered.append(fresh)
        next_index = fresh.end_index
        finished = fresh.finish_reason is not None
    return delivered, OutputCursor(cursor.request_id, last_entry_id, next_index, finished)


def collect_tokens(request_id: str, entries: Iterable[tuple[str, TokenChunk]]) -> tuple[list[int], bool]:
    """All output tokens of a stream read from its start, and whether it has ended."""
    chunks, cursor = advance(OutputCursor(request_id), entries)
    tokens = [token for chunk in chunks for token in chunk.token_ids]
    return tokens, cursor.finished


def _unseen_part(chunk: TokenChunk, next_index: int) -> TokenChunk | None:
    if chunk.start_index > next_index:
        # Writers always resume from the end they read, so a gap means the stream was
        # tampered with or partly expired. Deliver rather than stall the reader forever.
        logger.warning(
            "output stream has a gap",
            extra={
                "request_id": chunk.request_id,
                "expected_index": next_index,
                "start_index": chunk.start_index,
            },
        )
        return chunk
    overlap = next_index - chunk.start_index
    if overlap >= len(chunk.token_ids) and chunk.finish_reason is None:
        return None
    if overlap == 0:
        return chunk
    # Per-token lists are cut with the ids; one that does not match them (a damaged entry) is kept.
    size = len(chunk.token_ids)
    logprobs = chunk.logprobs[overlap:] if len(chunk.logprobs) == size else chunk.logprobs
    top = chunk.top_logprobs[overlap:] if len(chunk.top_logprobs) == size else chunk.top_logprobs
    return replace(
        chunk,
        start_index=next_index,
        token_ids=chunk.token_ids[overlap:],
        logprobs=logprobs,
        top_logprobs=top,
    )
