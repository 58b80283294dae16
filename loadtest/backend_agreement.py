"""Greedy agreement of the two engine backends: the same prompts through ``backend: vllm``
and ``backend: native``, one after the other in this process, token ids compared.

    python -m loadtest.backend_agreement --model DIR [--dtype float32] [--requests 32] [--max-tokens 64]

Needs vLLM (`make install-vllm`). Prints one JSON line: sequences identical, the share of
tokens produced before each sequence's first divergence, and position-wise agreement.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import torch
from transformers import AutoTokenizer

from services.engine.backend import EngineBackend, make_engine
from services.engine.config import EngineConfig
from services.messages import SamplingParams

PROMPTS = (
    "12+35=",
    "40+7=",
    "Count: 3 4 5",
    "25+61=",
    "The capital of France is",
    "def fib(n):",
    "Once upon a time",
    "Q: 7*8? A:",
)


def run(engine: EngineBackend, prompts: Sequence[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
    return [outputs[f"r{i}"] for i in range(len(prompts))]


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, object]:
    total = sum(len(seq) for seq in theirs)
    first = [
        next((j for j, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), min(len(x), len(y)))
        for x, y in zip(ours, theirs, strict=True)
    ]
    same = sum(sum(a == b for a, b in zip(x, y, strict=False)) for x, y in zip(ours, theirs, strict=True))
    return {
        "identical_sequences": sum(x == y for x, y in zip(ours, theirs, strict=True)),
        "tokens_before_first_divergence": round(sum(first) / total, 4),
        "positionwise_agreement": round(same / total, 4),
        "first_divergence": first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
    results: dict[str, object] = {"model": args.model, "dtype": args.dtype, "requests": args.requests}
    outputs = {}
    for backend in ("vllm", "native"):
        config = EngineConfig(
            model=args.model, backend=backend, dtype=args.dtype, block_size=32, max_model_len=2048
        )
        started = time.monotonic()
        engine = make_engine(config)
        outputs[backend] = run(engine, prompts, args.max_tokens)
        results[f"{backend}_s"] = round(time.monotonic() - started, 1)
    results |= agreement(outputs["native"], outputs["vllm"])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
