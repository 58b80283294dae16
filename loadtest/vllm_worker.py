"""Runs the benchmark workload through vLLM's ``LLM.generate`` and reports times and tokens as JSON.

Executed as a script by the interpreter that has vLLM (often a venv of its own, whose
transformers pin differs from ours), so it imports only the standard library and vLLM:
``python loadtest/vllm_worker.py < job.json > result.json``. The job names the model,
dtype, prompts (token ids), output lengths and scheduler limits; the result carries the
output token ids of every request, wall and CPU seconds of the one timed ``generate``
call, and vLLM's version. The engine core runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that its CPU time is this process's CPU time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def _configure_environment(threads: int, kv_cache_gib: int) -> None:
    # Set before vLLM is imported: it reads them at import and engine start.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    # No core pinning: our engine is not pinned either, and the cores are shared.
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def run(job: dict[str, Any]) -> dict[str, Any]:
    _configure_environment(int(job["threads"]), int(job["kv_cache_gib"]))
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    budget = job.get("max_num_batched_tokens")
    limits = {"max_num_batched_tokens": int(budget)} if budget else {}  # None: vLLM's own default
    # A check of outputs, not of speed, may skip vLLM's minutes of torch.compile at start-up,
    # and prompts go in as token ids, so a checkpoint without tokenizer files loads too.
    for option in ("enforce_eager", "skip_tokenizer_init"):
        if job.get(option):
            limits[option] = True
    started = time.perf_counter()
    llm = LLM(
        model=job["model"],
        dtype=job["dtype"],
        max_num_seqs=int(job["max_num_seqs"]),
        max_model_len=int(job["max_model_len"]),
        seed=0,
        **limits,
    )
    startup_s = time.perf_counter() - started
    scheduler = llm.llm_engine.vllm_config.scheduler_config

    # min_tokens holds EOS back until a request has its length, so that every contender does the
    # same work; a check of outputs leaves EOS to the model, as our engine's ignore_eos does.
    exact_lengths = job.get("exact_lengths", True)

    def params(n: int) -> SamplingParams:
        return SamplingParams(
            temperature=0.0, max_tokens=n, min_tokens=n if exact_lengths else 0, ignore_eos=True
        )

    # Untimed warm-up, as for every contender: one short request.
    llm.generate([TokensPrompt(prompt_token_ids=[5] * 32)], params(4), use_tqdm=False)
    prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in job["prompts"]]
    wall, cpu = time.perf_counter(), time.process_time()
    outputs = llm.generate(prompts, [params(n) for n in job["output_lengths"]], use_tqdm=False)
    wall_s, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "startup_s": startup_s,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        "max_num_seqs": scheduler.max_num_seqs,
        "outputs": [list(out.outputs[0].token_ids) for out in outputs],
    }


def main() -> int:
    job = json.load(sys.stdin)
    result = run(job)
    # The last line of stdout is the result; vLLM may print its own lines before it.
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
