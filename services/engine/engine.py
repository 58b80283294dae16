"""The engine core: continuous batching over a paged KV cache. No Ray, no Redis.

``step()`` reads as schedule -> run -> postprocess. Callers either use the
offline ``generate`` or drive ``add_request``/``step``/``abort`` themselves (the
serving replica does, pulling only as much work as ``capacity()`` says fits).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence as Seq

from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.model_runner import ModelRunner
from services.engine.models import ModelSpec
from services.engine.outputs import (
    CompletionOutput,
    EngineCapacity,
    EngineStats,
    RequestOutput,
    TokenLogprob,
)
from services.engine.request_checks import check_request
from services.engine.sampler import SampledToken, Sampler
from services.engine.scheduler import Scheduler, SchedulerOutput
from services.engine.sequence import Sequence
from services.errors import InvalidParameterError
from services.messages import MAX_SEED, FinishReason, SamplingParams

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        self.spec: ModelSpec = self.runner.model_spec
        self.max_model_len = min(
            config.max_model_len or self.spec.max_position_embeddings, self.spec.max_position_embeddings
        )
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler(config.torch_device)
        self.stats = EngineStats()
        self._sequences: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self._seed_source = random.Random(config.seed)
        logger.info(
            "engine ready",
            extra={
                "model": config.model,
                "device": config.device,
                "dtype": config.dtype,
                "kv_blocks": self.runner.num_blocks,
                "block_size": config.block_size,
            },
        )

    # ---- incremental interface ------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_ids: Seq[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        output_prefix: Seq[int] = (),
    ) -> None:
        """Queue a request. ``output_prefix`` resumes a request whose first outputs were
        produced elsewhere: they are prefilled with the prompt and generation continues
        with the same seed from output index ``len(output_prefix)``."""
        self._validate(request_id, prompt_ids, params, output_prefix)
        seed = params.seed if params.seed is not None else self._seed_source.randint(0, MAX_SEED)
        seq = Sequence(
            request_id=request_id,
            token_ids=[*prompt_ids, *output_prefix],
            num_prompt_tokens=len(prompt_ids),
            params=params,
            seed=seed,
            priority=priority,
            arrival_order=next(self._arrivals),
        )
        seq.num_emitted_tokens = len(output_prefix)
        self._sequences[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. False if it is not in the engine."""
        seq = self._sequences.pop(request_id, None)
        if seq is None:
            return False
        seq.finish_reason = FinishReason.ABORT
        self.scheduler.remove(seq)
        return True

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        self.stats.preemptions = self.scheduler.num_preemptions
        if scheduled.is_empty:
            return []
        logits, sampling_seqs = self.runner.run(scheduled)
        self._advance(scheduled)
        sampled = self.sampler.sample(logits, sampling_seqs) if sampling_seqs else []
        return [self._postprocess(seq, token) for seq, token in zip(sampling_seqs, sampled, strict=True)]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def capacity(self) -> EngineCapacity:
        return EngineCapacity(
            total_blocks=self.block_manager.num_blocks,
            free_blocks=self.block_manager.num_free_blocks,
            block_size=self.config.block_size,
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            max_num_seqs=self.config.max_num_seqs,
        )

    def reserved_blocks(self) -> int:
        """Blocks the admitted requests still need for tokens they already hold (prompts not yet
        prefilled): a caller pulling more work counts only on ``free_blocks`` minus these."""
        seqs = (*self.scheduler.running, *self.scheduler.waiting)
        return sum(self.block_manager.blocks_needed(seq, seq.num_uncomputed_tokens) for seq in seqs)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a request of ``num_tokens`` tokens (prompt + output) needs at most."""
        return -(-min(num_tokens, self.max_model_len) // self.config.block_size)

    # ---- offline interface ----------------------------------------------------------------
    def generate(
        self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams]
    ) -> list[CompletionOutput]:
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise InvalidParameterError("params", len(per_prompt), f"expected {len(prompts)} entries")
        ids = [f"offline-{next(self._arrivals)}" for _ in prompts]
        for request_id, prompt, request_params in zip(ids, prompts, per_prompt, strict=True):
            self.add_request(request_id, prompt, request_params)
        tokens: dict[str, list[int]] = {request_id: [] for request_id in ids}
        logprobs: dict[str, list[TokenLogprob]] = {request_id: [] for request_id in ids}
        finished: dict[str, RequestOutput] = {}
        while len(finished) < len(ids):
            for out in self.step():
                tokens[out.request_id].extend(out.new_token_ids)
                logprobs[out.request_id].extend(out.logprobs)
                if out.finished:
                    finished[out.request_id] = out
        return [
            CompletionOutput(
                request_id=request_id,
                prompt_token_ids=tuple(prompt),
                token_ids=tokens[request_id],
                finish_reason=finished[request_id].finish_reason or FinishReason.STOP,
                num_cached_tokens=finished[request_id].num_cached_tokens,
                logprobs=logprobs[request_id],
            )
            for request_id, prompt in zip(ids, prompts, strict=True)
        ]

    # ---- internals ------------------------------------------------------------------------
    def _advance(self, scheduled: SchedulerOutput) -> None:
        for seq in scheduled.decodes:
            seq.num_computed_tokens += 1
            self.block_manager.register_full_blocks(seq)
        for chunk in scheduled.prefills:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            self.block_manager.register_full_blocks(chunk.seq)
        self.stats.steps += 1
        self.stats.decode_tokens_computed += len(scheduled.decodes)
        self.stats.prefill_tokens_computed += sum(chunk.num_tokens for chunk in scheduled.prefills)

    def _postprocess(self, seq: Sequence, sampled: SampledToken) -> RequestOutput:
        seq.token_ids.append(sampled.token_id)
        seq.finish_reason = self._finish_reason(seq, sampled.token_id)
        start = seq.num_emitted_tokens
        seq.num_emitted_tokens = seq.num_output_tokens
        if seq.finish_reason is not None:
            self.scheduler.remove(seq)
            self._sequences.pop(seq.request_id, None)
            self.stats.cached_prompt_tokens += seq.num_cached_tokens
        logprobs: tuple[TokenLogprob, ...] = ()
        if sampled.logprob is not None:
            logprobs = (TokenLogprob(sampled.token_id, sampled.logprob, sampled.top_logprobs),)
        return RequestOutput(
            request_id=seq.request_id,
            start_index=start,
            new_token_ids=(sampled.token_id,),
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=logprobs,
        )

    def _finish_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params = seq.params
        if token_id in params.stop_token_ids:
            return FinishReason.STOP
        if not params.ignore_eos and token_id in self.spec.eos_token_ids:
            return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _validate(
        self, request_id: str, prompt_ids: Seq[int], params: SamplingParams, output_prefix: Seq[int]
    ) -> None:
        check_request(
            request_id,
            self._sequences,
            prompt_ids,
            params,
            output_prefix,
            vocab_size=self.spec.vocab_size,
            max_model_len=self.max_model_len,
        )
        needed = self.blocks_for(len(prompt_ids) + params.max_tokens)
        if needed > self.block_manager.num_blocks:
            raise InvalidParameterError(
                "max_tokens",
                params.max_tokens,
                f"prompt + max_tokens needs {needed} KV blocks of {self.block_manager.num_blocks}",
            )
