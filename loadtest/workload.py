"""The benchmark workload: seeded random prompts with seeded random output lengths.

Every contender gets the same list of requests. Prompts are random token ids
(a random-init model has no language to speak), greedy decoding, EOS ignored, so
the work is fully determined by the lengths.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int


@dataclass(frozen=True)
class WorkloadSpec:
    """How to draw a workload; the lengths are inclusive uniform ranges."""

    num_requests: int
    prompt_len_range: tuple[int, int]
    output_len_range: tuple[int, int]
    seed: int

    def describe(self) -> dict[str, object]:
        return {
            "num_requests": self.num_requests,
            "prompt_len_uniform": list(self.prompt_len_range),
            "output_len_uniform": list(self.output_len_range),
            "seed": self.seed,
            "decoding": "greedy, ignore_eos",
            "prompts": "random token ids",
        }


@dataclass(frozen=True)
class Workload:
    spec: WorkloadSpec
    requests: tuple[Request, ...]

    @property
    def prompts(self) -> list[list[int]]:
        return [list(r.prompt_ids) for r in self.requests]

    @property
    def output_lengths(self) -> list[int]:
        return [r.max_new_tokens for r in self.requests]

    @property
    def total_output_tokens(self) -> int:
        return sum(self.output_lengths)

    @property
    def total_prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) for r in self.requests)

    @property
    def max_total_len(self) -> int:
        return max(len(r.prompt_ids) + r.max_new_tokens for r in self.requests)

    def summary(self) -> dict[str, object]:
        return {
            **self.spec.describe(),
            "total_prompt_tokens": self.total_prompt_tokens,
            "total_output_tokens": self.total_output_tokens,
        }


def make_workload(spec: WorkloadSpec, vocab_size: int) -> Workload:
    """Draw ``spec.num_requests`` requests; the same spec and vocab always give the same workload."""
    rng = random.Random(spec.seed)
    # Ids below 3 are often special (pad/bos/eos) in Llama vocabularies; keep prompts ordinary.
    first_ordinary_id = 3
    requests = []
    for _ in range(spec.num_requests):
        prompt_len = rng.randint(*spec.prompt_len_range)
        output_len = rng.randint(*spec.output_len_range)
        prompt = tuple(rng.randrange(first_ordinary_id, vocab_size) for _ in range(prompt_len))
        requests.append(Request(prompt_ids=prompt, max_new_tokens=output_len))
    return Workload(spec=spec, requests=tuple(requests))
