"""The detokenizer deployment: one request's output stream -> text deltas.

It follows the request's Redis output stream from a cursor, so it does not
care which engine replica produced the tokens, or how many did (a reclaimed
request continues in the same stream). On a stop string it ends the client's
stream and asks the engine to stop the sequence.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace

from services.detokenizer.incremental import IncrementalDetokenizer
from services.detokenizer.stop import StopStringMatcher
from services.errors import QueueUnavailableError
from services.messages import FinishReason, StreamRequest, TextDelta, TokenChunk, Usage
from services.queue import OutputCursor, QueueClient, QueueConfig
from services.queue.outage import Backoff
from services.tokenizer.tokenizer import PromptTokenizer

# An idle stream re-issues its blocking read this often; the read returns at once when tokens arrive.
READ_BLOCK_MS = 1000

logger = logging.getLogger(__name__)


class DetokenizerService:
    def __init__(self, model_paths: Mapping[str, str], redis_url: str, queue_config: QueueConfig) -> None:
        self._tokenizers = {name: PromptTokenizer(path) for name, path in model_paths.items()}
        self._queue = QueueClient(redis_url, queue_config)
        self._outage_limit_s = queue_config.reader_outage_s

    async def stream(self, request: StreamRequest) -> AsyncIterator[TextDelta]:
        """Text deltas of the request's output from token ``request.from_token`` on.

        Tokens before ``from_token`` are still detokenized (the text of a token
        depends on those before it) and run through the stop strings, but not sent.
        """
        follower = _TextFollower(self._tokenizers[request.model], request.stop)
        cursor = OutputCursor(request.request_id)
        while not cursor.finished:
            chunks, cursor = await self._read(cursor)
            # Everything that arrived since the last read goes out as one delta: under load a
            # stream falls behind by a few steps, and one message per token would then cost
            # more than the engine step that made it. At light load each read holds one chunk.
            deltas: list[TextDelta] = []
            for chunk in chunks:
                seen, new = _split(chunk, request.from_token)
                if seen is not None:
                    follower.push(seen)
                if new is None:
                    continue
                delta = follower.push(new)
                if delta.matched_stop:
                    await self._stop_engine(request)
                    usage = Usage(request.num_prompt_tokens, new.end_index, 0)
                    deltas.append(replace(delta, usage=usage))
                    break
                deltas.append(delta)
            if deltas:
                merged = _merge(deltas)
                yield merged
                if merged.finish_reason is not None:
                    return

    async def _stop_engine(self, request: StreamRequest) -> None:
        """The client's text is complete at a stop string; the engine need not go on. Should Redis
        be away, the engine only runs to max_tokens and its output is never read: not worth failing
        the client's stream for."""
        try:
            await self._queue.cancel(request.model, request.request_id)
        except QueueUnavailableError:
            logger.warning(
                "could not stop the engine after a stop string", extra={"request_id": request.request_id}
            )

    async def _read(self, cursor: OutputCursor) -> tuple[list[TokenChunk], OutputCursor]:
        """The next read, waiting out a Redis outage of up to ``reader_outage_s`` (the request
        itself is safe in Redis; only this stream gives up, and the client can resume)."""
        backoff = Backoff()
        while True:
            try:
                read = await self._queue.read(cursor, block_ms=READ_BLOCK_MS)
            except QueueUnavailableError:
                if backoff.elapsed_s > self._outage_limit_s:
                    raise
                if not backoff.waiting:
                    logger.warning(
                        "output read failed; waiting for Redis", extra={"request_id": cursor.request_id}
                    )
                await asyncio.sleep(backoff.next_delay())
                continue
            if backoff.waiting:
                logger.info(
                    "output read resumed",
                    extra={"request_id": cursor.request_id, "outage_s": round(backoff.elapsed_s, 3)},
                )
            return read


class _TextFollower:
    """Incremental detokenization plus stop strings over the chunks of one request."""

    def __init__(self, tokenizer: PromptTokenizer, stops: tuple[str, ...]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopStringMatcher(stops) if stops else None

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
    )
    return seen, rest


def _merge(deltas: list[TextDelta]) -> TextDelta:
    """Consecutive deltas of one request as one; the last one's ending wins."""
    if len(deltas) == 1:
        return deltas[0]
    last = deltas[-1]
    return replace(
        last,
        text="".join(d.text for d in deltas),
        token_ids=tuple(t for d in deltas for t in d.token_ids),
        token_index=deltas[0].token_index,
        logprobs=tuple(lp for d in deltas for lp in d.logprobs),
    )
