"""The result document of `tokenline bench soak` and the table printed from it (pure).

``assemble`` joins the run's facts, what the clients saw (``LoadTally``) and the memory
series (``rss.Series``) into one dictionary; ``format_table`` prints it. JSON goes through
``loadtest.report.write_json``.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from loadtest.load_driver import LoadTally
from loadtest.rss import Series


def requests_summary(tally: LoadTally) -> dict[str, Any]:
    return {
        "completed": tally.completed,
        "refused": tally.refused,
        "refusal_wait_s_mean": tally.refusal_wait_s_mean,
        "refusal_wait_s_max": tally.refusal_wait_s_max,
        "failed": tally.failures,
        "failed_by_code": dict(tally.failed),
        "failure_examples": list(tally.failure_examples),
        "index_errors": tally.index_errors,
        # greedy kinds seen with more than one output: a float near-tie flipped in another batch
        "kinds_with_differing_outputs": len(tally.disagreements()),
        "output_tokens": tally.tokens,
        "wall_s": tally.wall_s,
        "tokens_per_s": tally.tokens_per_s,
        "completed_per_s": tally.completed_per_s,
    }


def assemble(
    *, context: Mapping[str, Any], tally: LoadTally, series: Sequence[Series], warmup_s: float
) -> dict[str, Any]:
    """The result document: ``context`` (run facts), the requests, and memory per process
    (``processes``) and per gauge (``gauges``), each with its slope after ``warmup_s``."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **context,
        "warmup_s": warmup_s,
        "requests": requests_summary(tally),
        "processes": [s.summary(warmup_s) for s in series if s.pid is not None],
        "gauges": [s.summary(warmup_s) for s in series if s.pid is None],
    }


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _slope(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def format_table(results: Mapping[str, Any]) -> str:
    requests = results["requests"]
    lines = [
        f"tokenline bench soak  {results['date']}  ({results['minutes']:g} min, "
        f"{results['concurrency']} streaming clients, {results['cpu_count']} CPUs)",
        f"workload: {results['workload']['description']}",
        f"memory sampled every {results['sample_every_s']:g} s; slope: least squares over the samples "
        f"after a {results['warmup_s']:.0f} s warm-up",
        "",
        f"{'process':<14}{'pid':>8}{'start MiB':>11}{'end MiB':>10}{'max MiB':>10}{'MiB/min':>10}",
    ]
    for row in results["processes"]:
        lines.append(
            f"{row['role']:<14}{row['pid']:>8}{_mib(row['start_mib']):>11}{_mib(row['end_mib']):>10}"
            f"{_mib(row['max_mib']):>10}{_slope(row['slope_mib_per_min']):>10}"
        )
    for row in results["gauges"]:
        lines.append(
            f"{row['role']:<22}{_mib(row['start_mib']):>11}{_mib(row['end_mib']):>10}"
            f"{_mib(row['max_mib']):>10}{_slope(row['slope_mib_per_min']):>10}"
        )
    lines += [
        "",
        f"requests: {requests['completed']} completed, {requests['refused']} refused, "
        f"{requests['failed']} failed {requests['failed_by_code'] or ''}".rstrip(),
        f"{requests['output_tokens']} output tokens in {requests['wall_s']:.0f} s: "
        f"{requests['tokens_per_s']:.1f} tok/s, {requests['completed_per_s']:.2f} requests/s",
    ]
    if requests["refused"]:
        lines.append(
            f"a refusal reached its client {requests['refusal_wait_s_mean']:.2f} s after the call "
            f"on average (max {requests['refusal_wait_s_max']:.2f} s)"
        )
    if requests["index_errors"]:
        lines.append(f"streams with a gap or a duplicate token index: {requests['index_errors']}")
    if requests["kinds_with_differing_outputs"]:
        lines.append(
            f"greedy request kinds with differing outputs: {requests['kinds_with_differing_outputs']}"
        )
    lines += [f"  {example}" for example in requests["failure_examples"]]
    return "\n".join(lines)
