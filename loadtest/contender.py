"""What one contender hands back from one timed run of the workload.

Throughput counts only the tokens the workload asked for: a static batch that
runs past a short request's length does that work for nothing, and it shows up
as time, not as tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loadtest.workload import Workload


@dataclass(frozen=True)
class ContenderResult:
    name: str
    wall_s: float
    # The output token ids each request received, truncated to what it asked for.
    outputs: list[list[int]]
    details: dict[str, object] = field(default_factory=dict)

    @property
    def output_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.outputs)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0


class WorkloadMismatchError(AssertionError):
    """A contender did not deliver exactly what the workload asked for: its number is void."""


def check_delivered(result: ContenderResult, workload: Workload) -> None:
    """Every request got exactly its ``max_new_tokens`` tokens (EOS is ignored everywhere)."""
    asked = workload.output_lengths
    got = [len(tokens) for tokens in result.outputs]
    if got != asked:
        wrong = [(i, a, g) for i, (a, g) in enumerate(zip(asked, got, strict=False)) if a != g][:5]
        raise WorkloadMismatchError(
            f"{result.name}: {len(got)} outputs for {len(asked)} requests; "
            f"first mismatches (request, asked, got): {wrong}"
        )


def greedy_agreement(a: ContenderResult, b: ContenderResult) -> float:
    """Fraction of output positions, over all requests, before the two first disagree.

    Greedy decoding of the same weights should agree; float32 reductions in a
    different order can flip a near-tie and then the continuations diverge, which
    is why this is reported, not asserted.
    """
    total = 0
    agreed = 0
    for left, right in zip(a.outputs, b.outputs, strict=True):
        total += max(len(left), len(right))
        for x, y in zip(left, right, strict=False):
            if x != y:
                break
            agreed += 1
    return agreed / total if total else 1.0
