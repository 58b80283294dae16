"""What the engine core hands back: token ids only (text lives on the output side)."""

from __future__ import annotations

from dataclasses import dataclass

from services.messages import FinishReason, TokenChunk, TopLogprob, TopLogprobs, Usage


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    """The new tokens of one request after one step.

    ``start_index`` is the output index of ``new_token_ids[0]``; a resumed request
    starts past the tokens it was resumed with.
    """

    request_id: str
    start_index: int
    new_token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def end_index(self) -> int:
        """The output index after this step's tokens."""
        return self.start_index + len(self.new_token_ids)

    def token_chunk(self) -> TokenChunk:
        """This step's tokens as the request's token stream carries them."""
        usage = None
        if self.finished:
            usage = Usage(self.num_prompt_tokens, self.end_index, self.num_cached_tokens)
        return TokenChunk(
            request_id=self.request_id,
            start_index=self.start_index,
            token_ids=self.new_token_ids,
            finish_reason=self.finish_reason,
            usage=usage,
            logprobs=tuple(entry.logprob for entry in self.logprobs),
            top_logprobs=self._top_logprobs(),
        )

    def _top_logprobs(self) -> TopLogprobs:
        if not any(entry.top for entry in self.logprobs):
            return ()  # logprobs unset or 0: nothing extra on the wire
        return tuple(tuple(TopLogprob(token_id, lp) for token_id, lp in entry.top) for entry in self.logprobs)


@dataclass(frozen=True)
class CompletionOutput:
    """The whole result of one request, as ``Engine.generate`` returns it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: list[int]
    finish_reason: FinishReason
    num_cached_tokens: int
    logprobs: list[TokenLogprob]


@dataclass(frozen=True)
class EngineCapacity:
    """What the engine can still take, so a caller pulls only work that fits."""

    total_blocks: int
    free_blocks: int
    block_size: int
    running: int
    waiting: int
    max_num_seqs: int

    @property
    def free_slots(self) -> int:
        return max(0, self.max_num_seqs - self.running - self.waiting)


@dataclass
class EngineStats:
    """Counters since the engine started (for tests, metrics and benchmarks)."""

    steps: int = 0
    prefill_tokens_computed: int = 0
    decode_tokens_computed: int = 0
    cached_prompt_tokens: int = 0
    preemptions: int = 0
