"""`tokenline bench engine`: our engine against transformers on one machine, in one run.

Three contenders run the same workload on the same random-init Llama-shaped
checkpoint with the same maximum batch size B:

1. ours: ``Engine.generate`` over every request at once (continuous batching,
   chunked prefill, paged KV cache);
2. ``transformers`` ``generate()`` in static, left-padded batches of B, each batch
   running until its longest request is done;
3. ``transformers`` continuous batching (the manager behind ``generate_batch``).

Throughput is the tokens the requests asked for divided by wall seconds,
prefill included. A second, larger model measures batch-1 decode against the
memory-bandwidth roofline (see ``loadtest/roofline.py``).
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from loadtest import hf_baselines
from loadtest.bench_model import DECODE_MODEL, THROUGHPUT_MODEL, BenchModel, ModelShape, build_checkpoint
from loadtest.contender import ContenderResult, check_delivered, greedy_agreement
from loadtest.ours import EngineSettings, build_engine, run_ours, warm_up
from loadtest.report import check_targets, format_table, write_json
from loadtest.roofline import measure_bandwidth, measure_decode_b1, roofline_report
from loadtest.workload import Workload, WorkloadSpec, make_workload

Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchPlan:
    """Everything one run depends on; ``quick`` changes only how many requests and decode steps."""

    workload: WorkloadSpec
    throughput_model: ModelShape
    decode_model: ModelShape
    engine: EngineSettings
    decode_prompt_len: int
    decode_steps: int
    bandwidth_buffer_bytes: int
    quick: bool
    seed: int = 0
    torch_threads: int | None = None  # None: torch's default (one per core)


def plan_for(quick: bool) -> BenchPlan:
    """The plan behind `tokenline bench engine [--quick]`.

    B=32: on CPU a decode step's matmuls only reach decent efficiency with a few
    dozen rows, and 32 concurrent requests is a realistic serving batch.
    Token budget 512: one prefill chunk of up to ~500 tokens plus the running
    decodes per step -- big enough for efficient matmuls, small enough that
    decodes are not stalled for long behind a prefill. The quick run is one
    batch-worth of requests (32), the full run two (64).

    One intra-op thread for every contender: the 2 cores are shared with other
    processes, and a 2-thread OpenMP team then stalls at every parallel region
    until the descheduled thread runs again (measured here: a 16x512 by 512x2816
    matmul took 15 ms with 2 threads vs 1.3 ms with 1). ``transformers``' continuous
    batching runs its model in a background Python thread, which torch does not
    parallelise the same way, so leaving the default would also hand that
    contender a different threading model from the other two.
    """
    return BenchPlan(
        workload=WorkloadSpec(
            num_requests=32 if quick else 64, prompt_len_range=(16, 512), output_len_range=(16, 256), seed=0
        ),
        throughput_model=THROUGHPUT_MODEL,
        decode_model=DECODE_MODEL,
        engine=EngineSettings(max_batch_size=32, max_num_batched_tokens=512, kv_cache_memory_gib=1.0),
        decode_prompt_len=16,
        decode_steps=64 if quick else 128,
        bandwidth_buffer_bytes=256 << 20,
        quick=quick,
        torch_threads=1,
    )


def run_engine_benchmark(quick: bool, json_path: Path | None) -> dict[str, Any]:
    """Run the benchmark, print the table, write JSON to ``json_path`` if given; return the results."""
    return run_plan(plan_for(quick), json_path, log=_stderr)


def run_plan(plan: BenchPlan, json_path: Path | None, log: Log) -> dict[str, Any]:
    if plan.torch_threads is not None:
        torch.set_num_threads(plan.torch_threads)  # the same for every contender: set once, up front
    with tempfile.TemporaryDirectory(prefix="tokenline-bench-") as scratch:
        root = Path(scratch)
        log(f"building {plan.throughput_model.name} checkpoint")
        model = build_checkpoint(plan.throughput_model, root / plan.throughput_model.name, plan.seed)
        workload = make_workload(plan.workload, plan.throughput_model.vocab_size)
        contenders = _run_contenders(plan, model, workload, log)
        log(f"building {plan.decode_model.name} checkpoint for batch-1 decode")
        decode_model = build_checkpoint(plan.decode_model, root / plan.decode_model.name, plan.seed)
        roofline = _run_roofline(plan, decode_model, log)

    ours, static, cb = contenders["ours"], contenders["hf_static"], contenders["hf_cb"]
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": plan.quick,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "model": _model_facts(model),
        "workload": {**workload.summary(), "output_lengths": workload.output_lengths},
        "max_batch_size": plan.engine.max_batch_size,
        "max_num_batched_tokens": plan.engine.max_num_batched_tokens,
        "ours_tok_s": ours.tok_s,
        "hf_static_tok_s": static.tok_s,
        "hf_cb_tok_s": cb.tok_s,
        "ratio_vs_hf_static": ours.tok_s / static.tok_s,
        "ratio_vs_hf_cb": ours.tok_s / cb.tok_s,
        # The same ratios over CPU seconds: robust to other processes sharing the cores.
        "ratio_vs_hf_static_cpu": ours.tok_per_cpu_s / static.tok_per_cpu_s,
        "ratio_vs_hf_cb_cpu": ours.tok_per_cpu_s / cb.tok_per_cpu_s,
        "contenders": {name: _contender_facts(result) for name, result in contenders.items()},
        "greedy_agreement": {
            "hf_static": greedy_agreement(ours, static),
            "hf_cb": greedy_agreement(ours, cb),
        },
        "decode_model": _model_facts(decode_model),
        "decode_b1_prompt_len": plan.decode_prompt_len,
        "decode_b1_steps": plan.decode_steps,
        **roofline,
    }
    results["targets"] = check_targets(results)
    print(format_table(results), flush=True)
    if json_path is not None:
        write_json(results, json_path)
        log(f"wrote {json_path}")
    return results


def _run_contenders(
    plan: BenchPlan, model: BenchModel, workload: Workload, log: Log
) -> dict[str, ContenderResult]:
    """Each contender warms up untimed, runs the workload once, and is freed before the next."""
    hf_baselines.quiet_transformers()
    batch_size = plan.engine.max_batch_size
    vocab = plan.throughput_model.vocab_size

    log(f"ours: {workload.spec.num_requests} requests, B={batch_size}")
    engine = build_engine(model.path, plan.engine)
    warm_up(engine, vocab)
    ours = run_ours(engine, workload)
    del engine
    gc.collect()

    hf_model = hf_baselines.load_hf_model(model.path)
    log("transformers generate(), static batches")
    hf_baselines.warm_up_static(hf_model)
    static = hf_baselines.run_hf_static(hf_model, workload, batch_size)
    log("transformers continuous batching")
    cb_config = hf_baselines.cb_config(batch_size, plan.engine.max_num_batched_tokens, workload)
    cb = hf_baselines.run_hf_continuous(hf_model, workload, cb_config)
    del hf_model
    gc.collect()

    results = {"ours": ours, "hf_static": static, "hf_cb": cb}
    for result in results.values():
        check_delivered(result, workload)
        log(
            f"  {result.name}: {result.output_tokens} tokens in {result.wall_s:.2f} s "
            f"({result.cpu_s:.2f} CPU s) = {result.tok_s:.1f} tok/s"
        )
    return results


def _run_roofline(plan: BenchPlan, model: BenchModel, log: Log) -> dict[str, float | int | list[float]]:
    settings = EngineSettings(
        max_batch_size=1,
        max_num_batched_tokens=max(plan.decode_prompt_len, 64),
        kv_cache_memory_gib=0.25,
        block_size=plan.engine.block_size,
    )
    engine = build_engine(model.path, settings)
    log(f"batch-1 decode: {plan.decode_steps} steps after a {plan.decode_prompt_len}-token prompt")
    vocab = plan.decode_model.vocab_size
    decode = measure_decode_b1(engine, plan.decode_prompt_len, plan.decode_steps, vocab)
    del engine
    gc.collect()
    log("memory bandwidth: tensor copy and matrix-vector read stream")
    bandwidth = measure_bandwidth(plan.bandwidth_buffer_bytes)
    return roofline_report(model, decode, bandwidth).as_dict()


def _model_facts(model: BenchModel) -> dict[str, Any]:
    shape = asdict(model.shape)
    return {"name": shape.pop("name"), "params": model.num_params, "shape": shape}


def _contender_facts(result: ContenderResult) -> dict[str, Any]:
    return {
        "wall_s": result.wall_s,
        "cpu_s": result.cpu_s,
        "output_tokens": result.output_tokens,
        "tok_s": result.tok_s,
        "tok_per_cpu_s": result.tok_per_cpu_s,
        "tokens_per_request": [len(tokens) for tokens in result.outputs],
        **result.details,
    }


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
