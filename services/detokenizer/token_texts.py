"""The text of a single token decoded on its own: what names a top-logprob alternative.

An alternative was not generated, so it has no place in the output text to take its text
from; it gets ``decode([token_id])`` with special tokens skipped. That is empty for a
special token (end-of-sequence), U+FFFD for a token holding part of a multi-byte UTF-8
character, and for a SentencePiece tokenizer it may lack the leading space the token has
inside a text.

A request that asks for 20 alternatives per token would otherwise decode 20 ids per token;
the same few thousand ids come up again and again, so texts are cached per tokenizer. The
cache holds at most one entry per vocabulary id (ids come from the engine, which only
produces ids below the vocabulary size).
"""

from __future__ import annotations

from dataclasses import replace

from services.detokenizer.incremental import TokenDecoder
from services.messages import TopLogprobs


class TokenTexts:
    """Decodes single tokens for one tokenizer, cached; share one per tokenizer."""

    def __init__(self, decoder: TokenDecoder) -> None:
        self._decoder = decoder
        self._texts: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._decoder.decode([token_id])
        return text

    def name_alternatives(self, top_logprobs: TopLogprobs) -> TopLogprobs:
        """``top_logprobs`` with each alternative's text filled in."""
        return tuple(
            tuple(replace(alternative, text=self.text(alternative.token_id)) for alternative in alternatives)
            for alternatives in top_logprobs
        )
