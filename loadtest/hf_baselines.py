"""Contenders 2 and 3: ``transformers`` static-batch ``generate`` and its continuous batching.

Both load the same checkpoint in float32 with the ``sdpa`` attention
implementation. On CPU that is also what continuous batching needs: it accepts
only ``sdpa``, ``paged|eager`` or a flash implementation, and flash kernels do
not exist for CPU (``auto_switch_to_flash`` finds none and keeps ``sdpa``).
EOS never stops anyone: the checkpoint's generation config holds no EOS id and
we pass none.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig, PreTrainedModel

from loadtest.contender import ContenderResult, Stopwatch
from loadtest.workload import Workload

ATTENTION = "sdpa"
PAD_ID = 0
_RESULT_POLL_S = 1.0


def load_hf_model(model_dir: Path) -> PreTrainedModel:
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=ATTENTION
    )
    model.train(False)  # inference mode for dropout-style layers (``eval()`` is untyped)
    return model


def _greedy_config(max_new_tokens: int) -> GenerationConfig:
    return GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=PAD_ID,
    )


# ---- static batches -------------------------------------------------------------------------
def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@torch.inference_mode()
def _generate_static_batch(
    model: PreTrainedModel, prompts: list[list[int]], lengths: list[int]
) -> list[list[int]]:
    """One left-padded batch that runs until its longest request is done."""
    ids, mask = _left_padded(prompts)
    out = model.generate(  # type: ignore[operator]
        input_ids=ids, attention_mask=mask, generation_config=_greedy_config(max(lengths))
    )
    new_tokens = out[:, ids.shape[1] :]
    return [new_tokens[row, :n].tolist() for row, n in enumerate(lengths)]


def run_hf_static(model: PreTrainedModel, workload: Workload, batch_size: int) -> ContenderResult:
    """Requests in arrival order, ``batch_size`` at a time; a batch starts when the previous ends."""
    prompts, lengths = workload.prompts, workload.output_lengths
    outputs: list[list[int]] = []
    computed = 0
    with Stopwatch() as clock:
        for first in range(0, len(prompts), batch_size):
            batch_prompts = prompts[first : first + batch_size]
            batch_lengths = lengths[first : first + batch_size]
            outputs.extend(_generate_static_batch(model, batch_prompts, batch_lengths))
            computed += len(batch_lengths) * max(batch_lengths)
    return ContenderResult(
        name="hf_static",
        wall_s=clock.wall_s,
        cpu_s=clock.cpu_s,
        outputs=outputs,
        details={"batch_size": batch_size, "decoded_positions_including_padding": computed},
    )


def warm_up_static(model: PreTrainedModel) -> None:
    _generate_static_batch(model, [[3] * 32, [4] * 16], [4, 2])


# ---- continuous batching ----------------------------------------------------------------------
def cb_config(batch_size: int, max_batch_tokens: int, workload: Workload) -> ContinuousBatchingConfig:
    """Same batch limit and token budget as ours; a KV cache sized so nothing is ever evicted.

    CUDA graphs and async double-buffering are GPU features; off on CPU. ``num_blocks``
    counts whole-model blocks of ``page_size`` tokens.
    """
    page_size = 256
    pages_per_request = -(-workload.max_total_len // page_size) + 1
    return ContinuousBatchingConfig(
        page_size=page_size,
        num_blocks=batch_size * pages_per_request + 4,
        max_batch_tokens=max_batch_tokens,
        max_requests_per_batch=batch_size,
        use_cuda_graph=False,
        use_async_batching=False,
        allow_block_sharing=False,  # random prompts share no prefix; ours gains nothing from it either
    )


@torch.inference_mode()
def run_hf_continuous(
    model: PreTrainedModel, workload: Workload, config: ContinuousBatchingConfig
) -> ContenderResult:
    """All requests queued at once, each with its own ``max_new_tokens``.

    ``generate_batch`` takes one ``max_new_tokens`` for every prompt, which would make
    every request as long as the longest; so this drives the same manager that
    ``generate_batch`` wraps (``continuous_batching_context_manager``), per request.
    Manager construction (the KV cache allocation) is not timed, like our engine's.
    """
    lengths = workload.output_lengths
    generation_config = _greedy_config(max(lengths))
    generation_config.eos_token_id = -1  # the CB manager's spelling of "no EOS"
    request_ids = [f"bench-{i}" for i in range(len(lengths))]
    results: dict[str, list[int]] = {}
    errors: list[str] = []
    with (
        model.continuous_batching_context_manager(  # type: ignore[operator]
            generation_config=generation_config,
            continuous_batching_config=config,
            block=True,
            timeout=30,
            warmup=False,
        ) as manager,
        Stopwatch() as clock,
    ):
        for request_id, prompt, n in zip(request_ids, workload.prompts, lengths, strict=True):
            manager.add_request(prompt, request_id=request_id, max_new_tokens=n)
        while len(results) + len(errors) < len(request_ids):
            result = manager.get_result(timeout=_RESULT_POLL_S)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers continuous batching loop stopped before finishing")
                continue
            if result.is_finished():
                if result.error is not None:
                    errors.append(f"{result.request_id}: {result.error}")
                results[result.request_id] = list(result.generated_tokens)
    if errors:
        raise RuntimeError(f"transformers continuous batching failed requests: {errors[:3]}")
    return ContenderResult(
        name="hf_cb",
        wall_s=clock.wall_s,
        cpu_s=clock.cpu_s,
        outputs=[results[r] for r in request_ids],
        details={
            "attn_implementation": model.config._attn_implementation,
            "max_requests_per_batch": config.max_requests_per_batch,
            "max_batch_tokens": config.max_batch_tokens,
            "page_size": config.page_size,
        },
    )


def quiet_transformers() -> None:
    """The CB manager logs per-request warnings on CPU; keep the benchmark output readable."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
