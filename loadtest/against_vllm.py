"""`tokenline bench engine --against vllm`: our engine and vLLM on one real model, one after the other.

Same workload as `tokenline bench engine` (32 requests, prompts U[16, 512] of random token
ids, outputs U[16, 256], greedy, ignore_eos, max batch 32) on a real checkpoint (default:
SmolLM2-135M-Instruct from `tokenline smollm2`), the same dtype and intra-op thread count for
both. Each side warms up untimed, then runs the whole workload once; vLLM's engine start
(model load and its torch.compile) is not timed. Reports ``ratio_vs_vllm`` over wall seconds
and over CPU seconds (steadier when other processes share the cores) and the greedy
agreement of the two outputs.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loadtest.contender import ContenderResult, check_delivered, greedy_agreement
from loadtest.ours import EngineSettings, build_engine, run_ours, warm_up
from loadtest.report import write_json
from loadtest.vllm_contender import find_vllm_python, run_vllm
from loadtest.workload import WorkloadSpec, make_workload
from services.errors import InvalidParameterError

Log = Callable[[str], None]
WORKLOAD = WorkloadSpec(num_requests=32, prompt_len_range=(16, 512), output_len_range=(16, 256), seed=0)
SETTINGS = EngineSettings(max_batch_size=32, max_num_batched_tokens=512, kv_cache_memory_gib=1.0)
VLLM_MAX_MODEL_LEN = 1024  # >= the longest request (512 + 256); bounds vLLM's KV cache planning


def default_model_dir() -> Path:
    from services.checkpoints.smollm2 import default_smollm2_dir, is_complete

    path = default_smollm2_dir()
    if not is_complete(path):
        raise InvalidParameterError(
            "model", str(path), "SmolLM2 is not built; run `make smollm2` or pass --model"
        )
    return path


def run_against_vllm(
    model_dir: Path | None,
    dtype: str,
    threads: int,
    json_path: Path | None,
    vllm_python: Path | None,
    log: Log,
    workload_spec: WorkloadSpec = WORKLOAD,
    settings: EngineSettings = SETTINGS,
    search_vllm: bool = True,
) -> dict[str, Any]:
    model = model_dir if model_dir is not None else default_model_dir()
    torch.set_num_threads(threads)
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    workload = make_workload(workload_spec, vocab)
    interpreter = find_vllm_python(vllm_python, search_defaults=search_vllm)
    log(interpreter.how)

    log(f"ours: {workload_spec.num_requests} requests, {dtype}, {threads} thread(s)")
    ours_settings = EngineSettings(**{**settings.__dict__, "dtype": dtype})
    engine = build_engine(model, ours_settings)
    warm_up(engine, vocab)
    ours = run_ours(engine, workload)
    del engine
    gc.collect()
    check_delivered(ours, workload)
    contenders: dict[str, ContenderResult] = {"ours": ours}

    vllm_facts: dict[str, object] | None = None
    if interpreter.python is not None:
        log("vLLM LLM.generate (startup, including its compile, is not timed)")
        run = run_vllm(
            interpreter.python,
            model,
            workload,
            dtype=dtype,
            threads=threads,
            max_num_seqs=settings.max_batch_size,
            max_model_len=VLLM_MAX_MODEL_LEN,
            max_num_batched_tokens=None,
        )
        check_delivered(run.result, workload)
        contenders["vllm"] = run.result
        vllm_facts = run.facts
    else:
        log("skipping the vLLM contender: " + interpreter.how)

    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "against": "vllm",
        "model_dir": str(model),
        "dtype": dtype,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "load_average": _load_average(),
        "torch_version": torch.__version__,
        "workload": {**workload.summary(), "output_lengths": workload.output_lengths},
        "max_batch_size": settings.max_batch_size,
        "ours_max_num_batched_tokens": settings.max_num_batched_tokens,
        "vllm_found": interpreter.how,
        "vllm": vllm_facts,
        "contenders": {
            name: {
                "wall_s": r.wall_s,
                "cpu_s": r.cpu_s,
                "output_tokens": r.output_tokens,
                "tok_s": r.tok_s,
                "tok_per_cpu_s": r.tok_per_cpu_s,
            }
            for name, r in contenders.items()
        },
        "ours_tok_s": ours.tok_s,
    }
    if "vllm" in contenders:
        theirs = contenders["vllm"]
        results["vllm_tok_s"] = theirs.tok_s
        results["ratio_vs_vllm"] = ours.tok_s / theirs.tok_s
        results["ratio_vs_vllm_cpu"] = ours.tok_per_cpu_s / theirs.tok_per_cpu_s
        results["greedy_agreement_vllm"] = greedy_agreement(ours, theirs)
    print(format_against_table(results), flush=True)
    if json_path is not None:
        write_json(results, json_path)
        log(f"wrote {json_path}")
    return results


def format_against_table(results: dict[str, Any]) -> str:
    workload = results["workload"]
    lines = [
        f"tokenline bench engine --against vllm  {results['date']}",
        f"model {results['model_dir']}, {results['dtype']}, {results['torch_threads']} thread(s), "
        f"max batch {results['max_batch_size']}, load average {results['load_average']}",
        f"workload: {workload['num_requests']} requests, prompt len U{workload['prompt_len_uniform']}, "
        f"output len U{workload['output_len_uniform']}, greedy, ignore_eos; "
        f"{workload['total_prompt_tokens']} prompt + {workload['total_output_tokens']} output tokens",
        f"vLLM: {results['vllm_found']}",
        "",
        f"{'contender':<10}{'out tok':>9}{'wall s':>9}{'tok/s':>9}{'CPU s':>9}{'tok/CPUs':>10}",
    ]
    for name, row in results["contenders"].items():
        lines.append(
            f"{name:<10}{row['output_tokens']:>9d}{row['wall_s']:>9.2f}{row['tok_s']:>9.1f}"
            f"{row['cpu_s']:>9.2f}{row['tok_per_cpu_s']:>10.1f}"
        )
    if "ratio_vs_vllm" in results:
        lines += [
            "",
            f"ratio_vs_vllm {results['ratio_vs_vllm']:.2f} (wall), "
            f"{results['ratio_vs_vllm_cpu']:.2f} (CPU s); "
            f"greedy agreement {results['greedy_agreement_vllm']:.3f}",
        ]
    return "\n".join(lines)


def _load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
