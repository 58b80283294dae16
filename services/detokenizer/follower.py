"""One request's text: incremental detokenization plus stop strings over its token chunks.

The detokenizer stage keeps one ``RequestText`` per request it owns. Tokens before
``from_token`` (text a previous owner already wrote) are still detokenized, because
a token's text depends on those before it, and run through the stop strings, but
produce no delta.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from services.detokenizer.incremental import IncrementalDetokenizer, TokenDecoder
from services.detokenizer.stop import StopStringMatcher
from services.detokenizer.token_texts import TokenTexts
from services.messages import FinishReason, StreamRequest, TextDelta, TokenChunk, Usage, merge_text_deltas


class RequestText:
    """The text side of one request: turns its token chunks into at most one delta per read."""

    def __init__(
        self,
        tokenizer: TokenDecoder,
        request: StreamRequest,
        from_token: int = 0,
        token_texts: TokenTexts | None = None,
    ) -> None:
        """``token_texts``: the tokenizer's shared cache of single-token texts (for the top
        alternatives of logprobs); None makes one of this request's own."""
        self.request = request
        self._follower = _TextFollower(tokenizer, request.stop, token_texts or TokenTexts(tokenizer))
        self._from_token = from_token
        self.finished = False

    def render(self, chunks: Sequence[TokenChunk]) -> TextDelta | None:
        """Everything these chunks add, as one delta (None when they add nothing to send).
        A stop string ends the request: its delta has ``matched_stop`` and the usage so far."""
        deltas: list[TextDelta] = []
        for chunk in chunks:
            seen, new = _split(chunk, self._from_token)
            if seen is not None:
                self._follower.push(seen)
            if new is None:
                continue
            delta = self._follower.push(new)
            if delta.matched_stop:
                usage = Usage(self.request.num_prompt_tokens, new.end_index, 0)
                deltas.append(replace(delta, usage=usage))
                break
            deltas.append(delta)
        if not deltas:
            return None
        merged = merge_text_deltas(deltas)
        self.finished = merged.finish_reason is not None
        return merged


class _TextFollower:
    """Incremental detokenization plus stop strings over the chunks of one request."""

    def __init__(self, tokenizer: TokenDecoder, stops: tuple[str, ...], token_texts: TokenTexts) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopStringMatcher(stops) if stops else None
        self._token_texts = token_texts

    def push(self, chunk: TokenChunk) -> TextDelta:
        text = self._detokenizer.push(chunk.token_ids)
        if chunk.finish_reason is not None:
            text += self._detokenizer.finish()
        finish_reason = chunk.finish_reason
        matched = None
        if self._stops is not None:
            text, matched = self._stops.push(text)
            if matched is not None:
                finish_reason = FinishReason.STOP
            elif chunk.finish_reason is not None:
                text += self._stops.finish()
        return TextDelta(
            request_id=chunk.request_id,
            text=text,
            token_ids=chunk.token_ids,
            token_index=chunk.start_index,
            finish_reason=finish_reason,
            matched_stop=matched or "",
            usage=chunk.usage,
            error=chunk.error,
            logprobs=chunk.logprobs,
            top_logprobs=self._token_texts.name_alternatives(chunk.top_logprobs),
        )


def _split(chunk: TokenChunk, from_token: int) -> tuple[TokenChunk | None, TokenChunk | None]:
    """(part the client already has, part to send); either may be None."""
    if chunk.start_index >= from_token:
        return None, chunk
    if chunk.end_index <= from_token and chunk.finish_reason is None:
        return chunk, None
    cut = min(len(chunk.token_ids), from_token - chunk.start_index)
    seen = TokenChunk(chunk.request_id, chunk.start_index, chunk.token_ids[:cut])
    rest = replace(
        chunk,
        start_index=chunk.start_index + cut,
        token_ids=chunk.token_ids[cut:],
        logprobs=chunk.logprobs[cut:],
        top_logprobs=chunk.top_logprobs[cut:],
    )
    return seen, rest
