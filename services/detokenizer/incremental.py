"""Token ids -> text deltas, one step at a time.

The deltas of one sequence always concatenate to the one-shot
``decode(all_ids)`` (special tokens skipped), however the ids are split into
pushes. Three things make that harder than decoding each new token on its own:

- A character can be split across tokens (byte-level BPE encodes UTF-8 bytes;
  an emoji is often two to four tokens). Decoding the first part alone gives
  U+FFFD. Such a tail is held back until the character completes.
- A token's text can depend on its neighbours (SentencePiece-style decoders
  strip the space of the first token; WordPiece joins ``##`` pieces).
- SentencePiece with byte fallback (Llama 2, Mistral) decodes a whole run of
  ``<0xNN>`` tokens at once, and renders *every* token of the run as U+FFFD when
  any byte sequence in it is invalid, so a character completed early in a run
  can still turn into U+FFFD later (see byte_runs.py).

The first two are handled by decoding a short window: a few *context* tokens
whose text was already emitted, followed by the *pending* tokens whose text was
not (fully) emitted. The pending text is the window's text minus the context's
text; its decode sees the same neighbours as the one-shot decode, and any
garbling at the window's start (a character cut in half) stays inside the
context. Each step decodes a window of a few tokens, so the cost per token does
not grow with the length of the output.

For the third, with a byte-fallback decoder the context and the pending tokens
are never split inside one run of byte tokens. A run whose bytes are valid so
far is held back until it ends (the next token is not a byte token) or turns
invalid; an invalid run is final, one U+FFFD per token, from then on.

Special tokens decode to nothing wherever they stand, so they are dropped on
arrival. Exact on any id sequence, invalid UTF-8 included, for byte-level BPE
(Llama 3, Qwen2/3) and for byte-fallback SentencePiece (Llama 2, Mistral).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from services.detokenizer.byte_runs import ByteRunTracker

REPLACEMENT_CHAR = "\ufffd"

# Already-emitted tokens decoded in front of the pending ones.
_CONTEXT_TOKENS = 4
# A UTF-8 character has at most four bytes and every token that has text at
# least one, so a character that started more than four tokens ago has either
# completed or is definitely invalid.
_MAX_CHAR_TOKENS = 4
# Pending tokens that still end in U+FFFD after this many: the output is
# degenerate (invalid byte sequences); settle what is certain so the window,
# and with it the cost per step, stays bounded.
_MAX_PENDING_TOKENS = 2 * _MAX_CHAR_TOKENS


class TokenDecoder(Protocol):
    """Decodes token ids to text without special tokens (``PromptTokenizer`` and
    ``TextDecoder`` are ones)."""

    def decode(self, token_ids: Sequence[int]) -> str: ...

    @property
    def skipped_token_ids(self) -> frozenset[int]:
        """Ids ``decode`` leaves out wherever they stand."""
        ...

    @property
    def byte_fallback_values(self) -> Mapping[int, int]:
        """Byte value of each ``<0xNN>`` id of a byte-fallback decoder; empty otherwise."""
        ...


class IncrementalDetokenizer:
    """Turns the output ids of one sequence, fed as they arrive, into text deltas."""

    def __init__(self, decoder: TokenDecoder) -> None:
        self._decoder = decoder
        self._skipped = decoder.skipped_token_ids
        byte_values = decoder.byte_fallback_values
        self._byte_runs = ByteRunTracker(byte_values) if byte_values else None
        self._num_pushed = 0
        self._ids: list[int] = []  # pushed ids without the skipped ones
        self._window_start = 0  # first context token
        self._pending_start = 0  # first token whose text was not fully emitted
        self._context_text = ""  # decode(ids[window_start:pending_start])
        self._emitted_pending = 0  # characters of the pending text already emitted
        # Byte fallback only: the emitted text ends inside a run of byte tokens that is
        # already invalid, so the pending tokens that continue it are U+FFFD each.
        self._in_invalid_run = False

    @property
    def num_tokens(self) -> int:
        """How many ids have been pushed (special tokens included)."""
        return self._num_pushed

    def push(self, token_ids: Sequence[int]) -> str:
        """Add the next ids; return the text that is now certain and not yet emitted."""
        self._num_pushed += len(token_ids)
        kept = [token for token in token_ids if token not in self._skipped]
        if not kept:
            return ""
        self._ids.extend(kept)
        if self._byte_runs is not None:
            self._byte_runs.extend(kept)
            return self._advance_byte_fallback(self._byte_runs, final=False)
        return self._advance_byte_level()

    def finish(self) -> str:
        """Flush the held-back tail: the sequence has ended, so an incomplete
        character is final and is emitted as the decoder renders it (U+FFFD)."""
        if self._byte_runs is not None:
            return self._advance_byte_fallback(self._byte_runs, final=True)
        if self._pending_start == len(self._ids):
            return ""
        delta = self._pending_text()[self._emitted_pending :]
        self._settle(len(self._ids))
        return delta

    def _advance_byte_level(self) -> str:
        """Emit the pending text up to a trailing U+FFFD that may still be a character
        being completed (the incomplete end of a byte sequence is all that can change)."""
        pending = self._pending_text()
        if not pending.endswith(REPLACEMENT_CHAR):
            delta = pending[self._emitted_pending :]
            self._settle(len(self._ids))
            return delta
        certain = pending.rstrip(REPLACEMENT_CHAR)
        delta = certain[self._emitted_pending :]
        self._emitted_pending = max(self._emitted_pending, len(certain))
        pending_tokens = len(self._ids) - self._pending_start
        if pending_tokens > _MAX_CHAR_TOKENS and self._settle_before_unfinished_tail(pending):
            return delta
        if pending_tokens > _MAX_PENDING_TOKENS:
            delta += self._settle_degenerate_tail(pending)
        return delta

    def _advance_byte_fallback(self, runs: ByteRunTracker, final: bool) -> str:
        """Emit the text of the pending tokens up to the trailing run of byte tokens,
        that run too when it is final (invalid, or the sequence ended). The context
        and the pending tokens are never split inside a run, so the window renders
        every run as the one-shot decode does."""
        end = len(self._ids)
        delta = ""
        if self._in_invalid_run:
            run_end = self._pending_start
            while run_end < end and runs.is_byte(self._ids[run_end]):
                run_end += 1
            delta = REPLACEMENT_CHAR * (run_end - self._pending_start)
            if run_end == end:
                # Still inside the run: no context is needed until a later token ends it.
                self._pending_start = end
                return delta
            self._in_invalid_run = False
            self._settle(run_end)
        trailing_run = runs.run_start < end
        final_to = end if final or runs.invalid else max(runs.run_start, self._pending_start)
        if final_to > self._pending_start:
            delta += self._pending_text(final_to)
            self._settle(final_to)
            self._in_invalid_run = trailing_run and final_to == end and not final
        return delta

    def _pending_text(self, end: int | None = None) -> str:
        """Text of ``ids[pending_start:end]`` as the one-shot decode renders it."""
        window_text = self._decoder.decode(self._ids[self._window_start : end])
        return window_text[len(self._context_text) :]

    def _settle(self, end: int) -> None:
        """Mark the text of ``ids[:end]`` as emitted; keep a few of them as context."""
        self._window_start = max(0, end - _CONTEXT_TOKENS)
        self._pending_start = end
        self._context_text = self._decoder.decode(self._ids[self._window_start : end])
        self._emitted_pending = 0

    def _settle_before_unfinished_tail(self, pending: str) -> bool:
        """Settle at the last character boundary before the unfinished character.

        Chunks that keep ending inside characters (three-token emoji fed three tokens
        at a time) would otherwise never settle and the window would grow with the
        output. A split is a boundary when the text before it ends in a complete
        character (no U+FFFD) and is a prefix of the pending text; that text was
        emitted already (it is part of the pending text's certain prefix). Only the
        last few splits can be: the unfinished character began at most
        ``_MAX_CHAR_TOKENS`` tokens ago. Returns whether it found one.
        """
        end = len(self._ids)
        for split in range(end - 1, max(self._pending_start, end - _MAX_CHAR_TOKENS), -1):
            window_text = self._decoder.decode(self._ids[self._window_start : split])
            head = window_text[len(self._context_text) :]
            if head and not head.endswith(REPLACEMENT_CHAR) and pending.startswith(head):
                emitted_after = self._emitted_pending - len(head)
                self._settle(split)
                self._emitted_pending = emitted_after
                return True
        return False

    def _settle_degenerate_tail(self, pending: str) -> str:
        """Settle the pending tokens before a split point no character spans.

        The split leaves the last ``_MAX_CHAR_TOKENS`` tokens pending. No character
        spans it when decoding both sides apart gives the same text as decoding
        them together; the text before it is then final. Returns what of that
        text was not emitted yet.
        """
        split = len(self._ids) - _MAX_CHAR_TOKENS
        head = self._decoder.decode(self._ids[self._window_start : split])[len(self._context_text) :]
        tail = self._decoder.decode(self._ids[split:])
        if head + tail != pending:
            return ""
        delta = head[self._emitted_pending :]
        emitted_tail = max(0, self._emitted_pending - len(head))
        # The tail was decoded on its own above, so it becomes a window without context.
        self._window_start = split
        self._pending_start = split
        self._context_text = ""
        self._emitted_pending = emitted_tail
        return delta
