"""Turns the benchmark's result dictionary into a printed table and a JSON file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# name -> (result key, minimum); the engine's acceptance targets on the 2-core CPU.
TARGETS: dict[str, tuple[str, float]] = {
    "ratio_vs_hf_static": ("ratio_vs_hf_static", 2.0),
    "ratio_vs_hf_cb": ("ratio_vs_hf_cb", 3.0),
    "decode_b1_roofline_ratio": ("decode_b1_roofline_ratio", 0.7),
}


def check_targets(results: Mapping[str, Any]) -> dict[str, dict[str, float | bool]]:
    checked: dict[str, dict[str, float | bool]] = {}
    for name, (key, minimum) in TARGETS.items():
        value = float(results[key])
        checked[name] = {"value": value, "target": minimum, "met": value >= minimum}
    return checked


def format_table(results: Mapping[str, Any]) -> str:
    contenders: Mapping[str, Mapping[str, Any]] = results["contenders"]
    workload = results["workload"]
    ours = float(results["ours_tok_s"])
    lines = [
        f"tokenline bench engine  {results['date']}  (quick={results['quick']})",
        f"model {results['model']['name']} ({results['model']['params'] / 1e6:.1f}M params, float32), "
        f"torch threads {results['torch_threads']}, max batch size B={results['max_batch_size']}, "
        f"token budget {results['max_num_batched_tokens']}",
        f"workload: {workload['num_requests']} requests, prompt len U{workload['prompt_len_uniform']}, "
        f"output len U{workload['output_len_uniform']}, greedy, ignore_eos; "
        f"{workload['total_prompt_tokens']} prompt + {workload['total_output_tokens']} output tokens",
        "",
        f"{'contender':<12}{'out tok':>9}{'wall s':>9}{'tok/s':>9}{'ours/it':>9}"
        f"{'CPU s':>9}{'tok/CPUs':>10}{'ours/it':>9}",
    ]
    ours_cpu = float(contenders["ours"]["tok_per_cpu_s"])
    for name, row in contenders.items():
        lines.append(
            f"{name:<12}{row['output_tokens']:>9d}{row['wall_s']:>9.2f}{row['tok_s']:>9.1f}"
            f"{_ratio(ours, row['tok_s']):>9.2f}{row['cpu_s']:>9.2f}{row['tok_per_cpu_s']:>10.1f}"
            f"{_ratio(ours_cpu, row['tok_per_cpu_s']):>9.2f}"
        )
    lines += [
        "",
        f"decode at batch 1 ({results['decode_model']['name']}, "
        f"{results['decode_model']['params'] / 1e6:.1f}M params, float32): "
        f"{results['decode_b1_tok_s']:.1f} tok/s",
        f"  copy bandwidth {results['copy_bandwidth_gb_s']:.1f} GB/s (read+write bytes) / "
        f"{results['decode_b1_weight_bytes_per_step'] / 1e6:.0f} MB weights per step = "
        f"roofline {results['decode_b1_roofline_tok_s']:.1f} tok/s -> ratio "
        f"{results['decode_b1_roofline_ratio']:.2f}",
        f"  read-stream bandwidth {results['read_bandwidth_gb_s']:.1f} GB/s (matrix-vector) -> roofline "
        f"{results['decode_b1_read_roofline_tok_s']:.1f} tok/s -> ratio "
        f"{results['decode_b1_read_roofline_ratio']:.2f}",
        "",
        f"greedy agreement with ours (token positions before first divergence): "
        f"hf_static {results['greedy_agreement']['hf_static']:.2f}, "
        f"hf_cb {results['greedy_agreement']['hf_cb']:.2f}",
        "targets:",
    ]
    for name, target in results["targets"].items():
        verdict = "met" if target["met"] else "MISSED"
        lines.append(f"  {name:<26} {target['value']:>7.2f}  (>= {target['target']:.1f})  {verdict}")
    return "\n".join(lines)


def _ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else float("inf")


def write_json(results: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
