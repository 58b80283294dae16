"""Token ids -> text deltas, one step at a time.

The deltas of one sequence always concatenate to the one-shot
``decode(all_ids)`` (special tokens skipped). Two things make that harder than
decoding each new token on its own:

- A character can be split across tokens (byte-level BPE encodes UTF-8 bytes;
  an emoji is often two to four tokens). Decoding the first part alone gives
  U+FFFD. Such a tail is held back until the character completes.
- A token's text can depend on its neighbours (SentencePiece-style decoders
  strip the space of the first token; WordPiece joins ``##`` pieces).

Both are handled by decoding a short window: a few *context* tokens whose
text was already emitted, followed by the *pending* tokens whose text was not
(fully) emitted. The pending text is the window's text minus the context's
text; its decode sees the same neighbours as the one-shot decode, and any
garbling at the window's start (a character cut in half) stays inside the
context. Each step decodes a window of a few tokens, so the cost per token does
not grow with the length of the output.

Exact for byte-level BPE (Llama 3, Qwen2/3) on any id sequence, invalid UTF-8
included. SentencePiece byte-fallback decoders render a whole run of byte
tokens as U+FFFD once any byte in it is invalid, including characters already
emitted; for them the stream is exact as long as the model's bytes form valid
UTF-8.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

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
    """Decodes token ids to text without special tokens (``PromptTokenizer`` is one)."""

    def decode(self, token_ids: Sequence[int]) -> str: ...


class IncrementalDetokenizer:
    """Turns the output ids of one sequence, fed as they arrive, into text deltas."""

    def __init__(self, decoder: TokenDecoder) -> None:
        self._decoder = decoder
        self._ids: list[int] = []
        self._window_start = 0  # first context token
        self._pending_start = 0  # first token whose text was not fully emitted
        self._context_text = ""  # decode(ids[window_start:pending_start])
        self._emitted_pending = 0  # characters of the pending text already emitted

    @property
    def num_tokens(self) -> int:
        """How many ids have been pushed."""
        return len(self._ids)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add the next ids; return the text that is now certain and not yet emitted."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        pending = self._pending_text()
        if not pending.endswith(REPLACEMENT_CHAR):
            delta = pending[self._emitted_pending :]
            self._settle(len(self._ids))
            return delta
        # The trailing U+FFFD may be a character still being completed; everything
        # before it is final (only the incomplete end of a byte sequence can change).
        certain = pending.rstrip(REPLACEMENT_CHAR)
        delta = certain[self._emitted_pending :]
        self._emitted_pending = max(self._emitted_pending, len(certain))
        if len(self._ids) - self._pending_start > _MAX_PENDING_TOKENS:
            delta += self._settle_degenerate_tail(pending)
        return delta

    def finish(self) -> str:
        """Flush the held-back tail: the sequence has ended, so an incomplete
        character is final and is emitted as the decoder renders it (U+FFFD)."""
        delta = self._pending_text()[self._emitted_pending :]
        self._settle(len(self._ids))
        return delta

    def _pending_text(self) -> str:
        window_text = self._decoder.decode(self._ids[self._window_start :])
        return window_text[len(self._context_text) :]

    def _settle(self, end: int) -> None:
        """Mark the text of ``ids[:end]`` as emitted; keep a few of them as context."""
        self._window_start = max(0, end - _CONTEXT_TOKENS)
        self._pending_start = end
        self._context_text = self._decoder.decode(self._ids[self._window_start : end])
        self._emitted_pending = 0

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
