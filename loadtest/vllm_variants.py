"""Does vLLM serve the optimizer's variants? Each recipe's checkpoint, loaded by vLLM and by us.

``python -m loadtest.vllm_variants [--model DIR] [--recipes int8 w8a8 ...] [--tokens N]
[--vllm-python PATH] [--json FILE]``

For the source model and each recipe: write the variant (``services/optimizer/writer``, the
optimizer's own writer) into a temporary directory, generate greedily from a few English
prompts with our engine, then load the same directory with vLLM's ``LLM`` in a child process
(``loadtest/vllm_worker.py``; eager mode, prompts as token ids) and generate the same. The
table says, per checkpoint, whether vLLM loaded and served it, what it refused and why (the
last error line of the child), and how far its greedy tokens agree with ours. vLLM is found
as by the engine benchmark (``loadtest/vllm_contender.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loadtest.against_vllm import default_model_dir
from loadtest.contender import ContenderResult, greedy_agreement
from loadtest.ours import greedy_params
from loadtest.vllm_contender import find_vllm_python, run_vllm
from loadtest.workload import Request, Workload, WorkloadSpec
from services.engine import EngineConfig
from services.engine.engine import Engine
from services.optimizer.recipes import get_recipe
from services.optimizer.writer import quantize_checkpoint, write_variant

PROMPTS = (
    "The capital of France is",
    "A serving system for language models needs",
    "def fibonacci(n):",
    "Water boils at a temperature of",
)
DEFAULT_RECIPES = ("int8", "int8-all", "w8a8", "int4")
MAX_MODEL_LEN = 512
_ERROR = re.compile(r"((?:\w+\.)*\w+(?:Error|Exception): .*)$")
_RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s*")


def prompt_ids(model_dir: Path, texts: Sequence[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return [list(tokenizer(text)["input_ids"]) for text in texts]


def ours(model_dir: Path, prompts: list[list[int]], tokens: int) -> ContenderResult:
    config = EngineConfig(model=str(model_dir), device="cpu", dtype="float32", max_num_seqs=len(prompts))
    outputs = Engine(config).generate(prompts, greedy_params(tokens))
    return ContenderResult("ours", 0.0, 0.0, [list(out.token_ids) for out in outputs])


def eos_ids(model_dir: Path) -> set[int]:
    eos = json.loads((model_dir / "config.json").read_text()).get("eos_token_id")
    return set(eos) if isinstance(eos, list) else {eos} if isinstance(eos, int) else set()


def until_eos(result: ContenderResult, eos: set[int]) -> ContenderResult:
    """Each output up to and including its first EOS: what follows is noise under ignore_eos."""
    cut = [next((out[: i + 1] for i, token in enumerate(out) if token in eos), out) for out in result.outputs]
    return ContenderResult(result.name, result.wall_s, result.cpu_s, cut)


def refusal_reason(error: RuntimeError) -> str:
    """The last exception the vLLM child printed, with the five lines after it (vLLM's messages
    often go on there); ``error`` ends with the tail of the child's stderr."""
    lines = [_RANK_PREFIX.sub("", line).strip() for line in str(error).splitlines()]
    found = [i for i, line in enumerate(lines) if _ERROR.search(line)]
    if not found:
        return lines[0][:400]
    first = found[-1]
    return " ".join(line for line in lines[first : first + 6] if line)[:600]


def check(
    name: str, directory: Path, prompts: list[list[int]], tokens: int, python: Path | None
) -> tuple[dict[str, Any], ContenderResult, ContenderResult | None]:
    """The row of one checkpoint, and our and vLLM's outputs (None where vLLM did not serve it)."""
    row: dict[str, Any] = {"checkpoint": name}
    eos = eos_ids(directory)
    reference = until_eos(ours(directory, prompts, tokens), eos)
    row["ours_tokens"] = reference.outputs
    if python is None:
        row["vllm"] = "not run: vLLM not found"
        return row, reference, None
    spec = WorkloadSpec(len(prompts), (1, MAX_MODEL_LEN), (tokens, tokens), seed=0)
    workload = Workload(spec, tuple(Request(tuple(ids), tokens) for ids in prompts))
    try:
        run = run_vllm(
            python, directory, workload, dtype="float32", threads=torch.get_num_threads(),
            max_num_seqs=len(prompts), max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=None, eager=True,
            exact_lengths=False,
        )  # fmt: skip
    except RuntimeError as error:
        row["vllm"] = "refused"
        row["reason"] = refusal_reason(error)
        return row, reference, None
    row["vllm"] = "served"
    theirs = until_eos(run.result, eos)
    row["vllm_tokens"] = theirs.outputs
    row["greedy_agreement"] = greedy_agreement(reference, theirs)
    row["identical_outputs"] = sum(a == b for a, b in zip(reference.outputs, theirs.outputs, strict=True))
    return row, reference, theirs


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"vLLM on the optimizer's variants  {results['date']}  ({results['vllm_found']})",
        f"model {results['model_dir']}; {len(results['prompts'])} prompts x {results['tokens']} greedy "
        "tokens (each cut after its first EOS), float32",
        "ours=vLLM: share of greedy positions before the first difference; identical: whole outputs;",
        "vs src: each engine's variant against the same engine's source (the quantization's own effect)",
        "",
        _row("checkpoint", "vLLM", ["ours=vLLM", "identical", "ours vs src", "vLLM vs src"], "reason"),
    ]
    for row in results["rows"]:
        cells = [
            _figure(row, "greedy_agreement"),
            f"{row['identical_outputs']}/{len(results['prompts'])}" if "identical_outputs" in row else "-",
            _figure(row, "ours_vs_source"),
            _figure(row, "vllm_vs_source"),
        ]
        lines.append(_row(row["checkpoint"], row["vllm"], cells, row.get("reason", "")))
    return "\n".join(lines)


def _row(checkpoint: str, vllm: str, cells: list[str], reason: str) -> str:
    return f"{checkpoint:<10} {vllm:<8} " + " ".join(f"{cell:>11}" for cell in cells) + f"  {reason}"


def _figure(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "-"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.vllm_variants", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", type=Path, default=None, help="source checkpoint (default: SmolLM2)")
    parser.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES))
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument(
        "--prompt", action="append", default=None, help="a prompt (repeat; default: four English ones)"
    )
    parser.add_argument("--vllm-python", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    model = args.model if args.model is not None else default_model_dir()
    interpreter = find_vllm_python(args.vllm_python)
    print(interpreter.how, file=sys.stderr)
    texts = args.prompt or list(PROMPTS)
    prompts = prompt_ids(model, texts)
    print("source", file=sys.stderr)
    source_row, ours_source, vllm_source = check("source", model, prompts, args.tokens, interpreter.python)
    rows = [source_row]
    with tempfile.TemporaryDirectory(prefix="tokenline-vllm-variants-") as scratch:
        for name in args.recipes:
            print(name, file=sys.stderr)
            recipe = get_recipe(name)
            variant = Path(scratch) / name
            variant.mkdir()
            write_variant(model, quantize_checkpoint(model, recipe), recipe, variant)
            row, ours_variant, vllm_variant = check(name, variant, prompts, args.tokens, interpreter.python)
            # How far each engine's variant follows that engine's own source: the quantization's
            # effect, apart from the two engines' differences.
            row["ours_vs_source"] = greedy_agreement(ours_variant, ours_source)
            if vllm_variant is not None and vllm_source is not None:
                row["vllm_vs_source"] = greedy_agreement(vllm_variant, vllm_source)
            rows.append(row)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_dir": str(model),
        "tokens": args.tokens,
        "prompts": texts,
        "vllm_found": interpreter.how,
        "rows": rows,
    }
    print(format_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
