"""What one contender hands back from one timed run of the workload.

Throughput counts only the tokens the workload asked for: a static batch that
runs past a short request's length does that work for nothing, and it shows up
as time, not as tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loadtest.workload import Workload


class Stopwatch:
    """Wall time and this process's CPU time (all threads) over one ``with`` block.

    On a shared machine other processes steal cores, which inflates wall time by
    however much they happened to run; CPU time is the work this contender did
    itself, so it is reported next to wall time as the contention-robust view.
    """

    wall_s: float = 0.0
    cpu_s: float = 0.0

    def __enter__(self) -> Stopwatch:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = time.process_time() - self._cpu


@dataclass(frozen=True)
class ContenderResult:
    name: str
    wall_s: float
    cpu_s: float
    # The output token ids each request received, truncated to what it asked for.
    outputs: list[list[int]]
    details: dict[str, object] = field(default_factory=dict)

    @property
    def output_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.outputs)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tok_per_cpu_s(self) -> float:
        return self.output_tokens / self.cpu_s if self.cpu_s > 0 else 0.0


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
