"""Per-request clocks and what the pipeline benchmark computes from them (pure).

A ``RequestTrace`` is one request's start and the arrival time of each of its output
tokens; ``summarize`` turns the traces of one closed-loop run into throughput and
latency percentiles, in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from loadtest.contender import ContenderResult, greedy_agreement


@dataclass
class RequestTrace:
    """One request's clock: when it started and when each of its output tokens arrived."""

    start: float = 0.0
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    message_times: list[float] = field(default_factory=list)  # one per delivery that carried tokens

    @property
    def messages(self) -> int:
        return len(self.message_times)

    def add(self, when: float, token_ids: Sequence[int]) -> None:
        self.message_times.append(when)
        self.token_times.extend([when] * len(token_ids))
        self.token_ids.extend(token_ids)

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.start

    @property
    def itls_s(self) -> list[float]:
        """Gaps between consecutive deliveries, as vLLM's serving benchmark counts inter-token
        latency: a message carrying k tokens is one gap, not k - 1 gaps of zero."""
        return [b - a for a, b in zip(self.message_times, self.message_times[1:], strict=False)]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside [0, 100]")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(traces: Sequence[RequestTrace]) -> dict[str, float]:
    """Throughput and latency (milliseconds) of one closed-loop run."""
    done = [t for t in traces if t.token_times]
    if any(len(t.token_times) < 2 for t in done) or not done:
        raise ValueError("every request needs 2 tokens or more: inter-token latency is undefined otherwise")
    itls = [gap for t in done for gap in t.itls_s] or [0.0]
    start, end = min(t.start for t in done), max(t.token_times[-1] for t in done)
    tokens = sum(len(t.token_times) for t in done)
    ttfts = [t.ttft_s for t in done]
    e2e = [t.token_times[-1] - t.start for t in done]
    # TPOT = (e2e - TTFT) / (tokens - 1) per request: unlike ITL, blind to how tokens are bunched
    tpots = [(t.token_times[-1] - t.token_times[0]) / (len(t.token_times) - 1) for t in done]
    return {
        "requests": len(done),
        "output_tokens": tokens,
        "wall_s": end - start,
        "tok_s": tokens / (end - start) if end > start else 0.0,
        "ttft_p50_ms": 1e3 * percentile(ttfts, 50),
        "ttft_p99_ms": 1e3 * percentile(ttfts, 99),
        "itl_p50_ms": 1e3 * percentile(itls, 50),
        "itl_p99_ms": 1e3 * percentile(itls, 99),
        "itl_mean_ms": 1e3 * sum(itls) / len(itls),
        "tpot_p50_ms": 1e3 * percentile(tpots, 50),
        "tpot_p99_ms": 1e3 * percentile(tpots, 99),
        "tokens_per_message": tokens / sum(t.messages for t in done),
        "e2e_p50_ms": 1e3 * percentile(e2e, 50),
    }


def token_agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """Fraction of output positions, over all requests, before the two sides first differ
    (``contender.greedy_agreement`` over plain token lists). Greedy decoding of the same
    weights agrees unless a float near-tie flips in another batch."""
    return greedy_agreement(_outputs_only(a), _outputs_only(b))


def _outputs_only(outputs: Sequence[Sequence[int]]) -> ContenderResult:
    return ContenderResult(name="", wall_s=0.0, cpu_s=0.0, outputs=[list(ids) for ids in outputs])
