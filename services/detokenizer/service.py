"""The detokenizer deployment: one request's output stream -> text deltas.

It follows the request's Redis output stream from a cursor, so it does not
care which engine replica produced the tokens, or how many did (a reclaimed
request continues in the same stream). On a stop string it ends the client's
stream and asks the engine to stop the sequence.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import replace

from services.detokenizer.incremental import IncrementalDetokenizer
from services.detokenizer.stop import StopStringMatcher
from services.messages import FinishReason, StreamRequest, TextDelta, TokenChunk, Usage
from services.queue import OutputCursor, QueueClient, QueueConfig
from services.tokenizer.tokenizer import PromptTokenizer

# An idle stream re-issues its blocking read this often; the read returns at once when tokens arrive.
READ_BLOCK_MS = 1000


class DetokenizerService:
    def __init__(self, model_paths: Mapping[str, str], redis_url: str, queue_config: QueueConfig) -> None:
        self._tokenizers = {name: PromptTokenizer(path) for name, path in model_paths.items()}
        self._queue = QueueClient(redis_url, queue_config)

    async def stream(self, request: StreamRequest) -> AsyncIterator[TextDelta]:
        detokenizer = IncrementalDetokenizer(self._tokenizers[request.model])
        stops = StopStringMatcher(request.stop) if request.stop else None
        cursor = OutputCursor(request.request_id)
        while not cursor.finished:
            chunks, cursor = await self._queue.read(cursor, block_ms=READ_BLOCK_MS)
            for chunk in chunks:
                delta = _detokenize(chunk, detokenizer, stops)
                if stops is not None and stops.matched is not None:
                    await self._queue.cancel(request.model, request.request_id)
                    completion = delta.token_index + len(delta.token_ids)
                    yield replace(delta, usage=Usage(request.num_prompt_tokens, completion, 0))
                    return
                if delta.token_index + len(delta.token_ids) > request.from_token or delta.finish_reason:
                    yield _skip_before(delta, request.from_token)


def _detokenize(
    chunk: TokenChunk, detokenizer: IncrementalDetokenizer, stops: StopStringMatcher | None
) -> TextDelta:
    text = detokenizer.push(chunk.token_ids)
    if chunk.finish_reason is not None:
        text += detokenizer.finish()
    finish_reason = chunk.finish_reason
    matched = None
    if stops is not None:
        text, matched = stops.push(text)
        if matched is not None:
            finish_reason = FinishReason.STOP
        elif chunk.finish_reason is not None:
            text += stops.finish()
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
    )


def _skip_before(delta: TextDelta, from_token: int) -> TextDelta:
    """Drop the tokens (and their text) a resuming client already has."""
    if delta.token_index >= from_token:
        return delta
    skip = from_token - delta.token_index
    return TextDelta(
        request_id=delta.request_id,
        text="",
        token_ids=delta.token_ids[skip:],
        token_index=from_token,
        finish_reason=delta.finish_reason,
        matched_stop=delta.matched_stop,
        usage=delta.usage,
        error=delta.error,
        logprobs=delta.logprobs[skip:],
    )
