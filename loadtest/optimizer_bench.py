"""`tokenline bench optimizer`: a source model against each of its quantized variants, one run.

Same machine, same workload, same engine: decode tok/s at batch 1 and 16, prefill
tok/s, weight bytes held by the loaded model, peak RSS (each contender runs in a fresh
process), and each variant's gate figures against the source. The source runs in
float32 and in bfloat16; the variants run with a float32 engine (their quantized
linears compute in bfloat16 inside the kernels; see services/engine/models/quantized.py).
"""

from __future__ import annotations

import datetime
import json
import math
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

SMOLLM2_DIR = Path.home() / ".cache" / "tokenline" / "smollm2-135m-instruct"
RECIPES = ("int8", "int8-all", "w8a8", "int4", "int8-gptq", "int4-gptq")
# name -> (numerator contender, denominator contender, figure, minimum)
TARGETS: dict[str, tuple[str, str, str, float]] = {
    "int8_decode_b1_vs_fp32": ("int8", "float32", "decode_b1_tok_s", 1.8),
    "int8_decode_b1_vs_bf16": ("int8", "bfloat16", "decode_b1_tok_s", 1.2),
    "int4_decode_b1_vs_fp32": ("int4", "float32", "decode_b1_tok_s", 2.5),
    "w8a8_decode_b16_vs_fp32": ("w8a8", "float32", "decode_b16_tok_s", 1.5),
}
Log = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    prompt_len: int
    decode_steps: int
    prefill_len: int
    repeats: int
    threads: int = 1


def plan_for(quick: bool) -> Plan:
    return Plan(prompt_len=32, decode_steps=16 if quick else 48, prefill_len=256, repeats=1 if quick else 2)


def run_optimizer_benchmark(
    quick: bool, json_path: Path | None, model_dir: Path | None = None, log: Log | None = None
) -> dict[str, Any]:
    import torch

    from services.optimizer.calibration import calibrate
    from services.optimizer.config import OptimizerConfig
    from services.optimizer.gate import run_gate
    from services.optimizer.heldout import text_sequences
    from services.optimizer.recipes import RECIPES as ALL_RECIPES
    from services.optimizer.writer import quantize_checkpoint, write_variant

    say = log or _stderr
    source = model_dir or SMOLLM2_DIR
    if not (source / "config.json").is_file():
        raise SystemExit(f"no checkpoint at {source}: build SmolLM2 first (see README) or pass a directory")
    plan = plan_for(quick)
    torch.set_num_threads(plan.threads)  # the gate too: 2 threads on 2 shared cores oversubscribe
    config = OptimizerConfig()
    sequences = text_sequences(source, None, config.heldout_max_tokens, config.heldout_window)
    contenders: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tokenline-bench-opt-") as tmp:
        dirs: dict[str, tuple[Path, str]] = {"float32": (source, "float32"), "bfloat16": (source, "bfloat16")}
        gates: dict[str, dict[str, Any]] = {}
        hessians = None  # one calibration serves every GPTQ recipe: it depends on the source alone
        for name in RECIPES:
            recipe = ALL_RECIPES[name]
            out = Path(tmp) / name
            out.mkdir()
            if recipe.calibrated and hessians is None:
                say(f"calibrating {source.name} on {config.calibration_tokens} tokens of its own text")
                hessians = calibrate(source, recipe, config, lambda _done, _detail: None)
            say(f"quantizing {source.name} with {name}")
            write_variant(source, quantize_checkpoint(source, recipe, None, hessians), recipe, out)
            say(f"gating {name} on {sum(len(s) for s in sequences)} held-out tokens")
            gates[name] = run_gate(name, source, out, sequences, config.gates[name], None).to_dict()
            dirs[name] = (out, "float32")
        for name, (path, dtype) in dirs.items():
            say(f"measuring {name}")
            contenders[name] = _in_fresh_process(str(path), dtype, plan)
            if name in gates:
                contenders[name]["gate"] = gates[name]

    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": str(source),
        "quick": quick,
        "plan": plan.__dict__,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "heldout": "services/optimizer/data/heldout-design.txt (the project's design document)",
        "contenders": contenders,
    }
    results["float32_weight_bytes"] = float32_weight_bytes(source)
    results["targets"] = check_targets(contenders, results["float32_weight_bytes"])
    print(format_table(results))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        say(f"wrote {json_path}")
    return results


def float32_weight_bytes(source: Path) -> int:
    """The source model's weights in float32, every tensor once: the byte targets' baseline.
    Not the float32 engine's ``weight_bytes``, which also counts a packed copy of a tied head
    (``services/engine/models/cpu_gemm.py``), a runtime cache rather than model size."""
    elements = 0
    for file in source.glob("*.safetensors"):
        with safe_open(file, "pt") as tensors:
            names = tensors.keys()  # a safetensors file, not a dict: it is not iterable itself
            elements += sum(math.prod(tensors.get_slice(name).get_shape()) for name in names)
    return 4 * elements


def check_targets(contenders: dict[str, dict[str, Any]], fp32_bytes: int) -> dict[str, dict[str, Any]]:
    checked = {}
    for name, (top, bottom, figure, minimum) in TARGETS.items():
        ratio = contenders[top][figure] / contenders[bottom][figure]
        checked[name] = {"value": ratio, "target": minimum, "met": ratio >= minimum}
    # int8 keeps the embeddings in the source dtype (the float32 engine widens them when it loads
    # them, the checkpoint holds them as they came); int8-all holds them as int8 rows in both.
    for name in ("int8", "int8-all"):
        for figure in ("weight_bytes", "checkpoint_bytes"):
            ratio = contenders[name][figure] / fp32_bytes
            checked[f"{name}_{figure}_vs_fp32"] = {"value": ratio, "target_max": 0.3, "met": ratio <= 0.3}
    return checked


def format_table(results: dict[str, Any]) -> str:
    rows = results["contenders"]
    lines = [
        f"tokenline bench optimizer  {results['date']}  (quick={results['quick']}, "
        f"loadavg {' '.join(results['loadavg'])}, torch {results['torch']} {results['cpu_capability']})",
        f"model {results['model']}; held-out: {results['heldout']}",
        "",
        f"{'contender':<11}{'dec b1':>9}{'dec b16':>9}{'prefill':>9}{'weights MB':>11}{'on disk MB':>11}"
        f"{'peak RSS MB':>12}"
        f"{'ppl ratio':>10}{'mean KL':>9}{'top-1':>8}{'gate':>6}",
    ]
    for name, row in rows.items():
        cells = (
            f"{name:<11}{row['decode_b1_tok_s']:>9.1f}{row['decode_b16_tok_s']:>9.1f}"
            f"{row['prefill_tok_s']:>9.1f}{row['weight_bytes'] / 1e6:>11.1f}"
            f"{row['checkpoint_bytes'] / 1e6:>11.1f}"
            f"{row['peak_rss_bytes'] / 1e6:>12.1f}"
        )
        gate = row.get("gate")
        if gate:
            figures = gate["figures"] or {}
            nan = float("nan")
            cells += (
                f"{figures.get('perplexity_ratio', nan):>10.4f}{figures.get('mean_kl', nan):>9.4f}"
                f"{figures.get('top1_agreement', nan):>8.4f}{'pass' if gate['passed'] else 'FAIL':>6}"
            )
        else:
            cells += f"{'(source)':>10}"
        lines.append(cells)
    lines.append("")
    for name, check in results["targets"].items():
        bound = f">= {check['target']}" if "target" in check else f"<= {check['target_max']}"
        lines.append(f"  {name:<34}{check['value']:>7.2f}  ({bound}) {'met' if check['met'] else 'NOT MET'}")
    return "\n".join(lines)


def _in_fresh_process(path: str, dtype: str, plan: Plan) -> dict[str, Any]:
    """Measure in a new process so that peak RSS belongs to this contender alone."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        result: dict[str, Any] = pool.apply(_measure, (path, dtype, plan))
    return result


def _measure(path: str, dtype: str, plan: Plan) -> dict[str, Any]:
    import torch

    from services.engine.config import EngineConfig
    from services.engine.engine import Engine
    from services.messages import SamplingParams

    torch.set_num_threads(plan.threads)
    engine = Engine(
        EngineConfig(
            model=path, dtype=dtype, kv_cache_memory_gib=0.25, max_num_seqs=16, enable_prefix_caching=False
        )
    )
    model = engine.runner.model
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    vocab = engine.spec.vocab_size

    def prompts(count: int, length: int, salt: int) -> list[list[int]]:
        return [
            [(7 + 31 * (i + salt) + 17 * j) % (vocab - 10) + 5 for j in range(length)] for i in range(count)
        ]

    def timed(batch: list[list[int]], max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        started = time.perf_counter()
        engine.generate(batch, params)
        return time.perf_counter() - started

    def decode_seconds_per_step(batch: list[list[int]]) -> float:
        """Prefill every request first (untimed), then time the decode steps alone."""
        params = SamplingParams(max_tokens=plan.decode_steps + 1, temperature=0.0, ignore_eos=True)
        for index, prompt in enumerate(batch):
            engine.add_request(f"bench-{time.monotonic_ns()}-{index}", prompt, params)
        emitted = 0
        while emitted < len(batch):  # each request's first token comes with its prefill
            emitted += sum(len(out.new_token_ids) for out in engine.step())
        started = time.perf_counter()
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        return (time.perf_counter() - started) / max(steps, 1)

    timed(prompts(2, 16, 99), 4)  # warm-up
    figures: dict[str, Any] = {}
    for batch_size in (1, 16):
        best = min(
            decode_seconds_per_step(prompts(batch_size, plan.prompt_len, 1000 * r + batch_size))
            for r in range(plan.repeats)
        )
        figures[f"decode_b{batch_size}_tok_s"] = batch_size / best
    prefill = min(timed(prompts(1, plan.prefill_len, 7000 + r), 1) for r in range(plan.repeats))
    figures["prefill_tok_s"] = plan.prefill_len / prefill
    figures["weight_bytes"] = weight_bytes
    figures["checkpoint_bytes"] = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    figures["peak_rss_bytes"] = _peak_rss_bytes()
    figures["dtype"] = dtype
    return figures


def _peak_rss_bytes() -> int:
    """VmHWM: this process's own peak (ru_maxrss would carry the parent's across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
