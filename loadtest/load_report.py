"""Writes the load sweep's results: a table, CSV, JSON and PNG plots (matplotlib).

matplotlib comes with the ``bench`` extra (``pip install -e '.[bench]'``); without it
the CSV and JSON are still written and the error says what to install.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtest.report import write_json

COLUMNS = (
    "users", "requests", "failures", "output_tokens", "wall_s", "tokens_per_s",
    "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
    "tpot_p50_ms", "tpot_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "loadavg_1m_after",
)  # fmt: skip
_TABLE = (
    ("users", "users", "{:d}"),
    ("requests", "streams", "{:d}"),
    ("failures", "failures", "{:d}"),
    ("tokens_per_s", "tokens/s", "{:.1f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.1f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.1f}"),
    ("itl_p50_ms", "ITL p50 ms", "{:.1f}"),
    ("itl_p99_ms", "ITL p99 ms", "{:.1f}"),
    ("tpot_p50_ms", "TPOT p50 ms", "{:.1f}"),
    ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"),
)


class PlotError(RuntimeError):
    """matplotlib is missing."""


def write_outputs(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """``load.csv``, ``load.json`` and the plots in ``out_dir``; the paths written."""
    rows: Sequence[Mapping[str, Any]] = results["rows"]
    csv_path = out_dir / "load.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path = out_dir / "load.json"
    write_json(dict(results), json_path)
    return [csv_path, json_path, *plot(results, out_dir)]


def format_table(results: Mapping[str, Any]) -> str:
    """A Markdown table of the sweep, with the run's context above it."""
    header = "| " + " | ".join(title for _, title, _ in _TABLE) + " |"
    rule = "|" + "|".join("---:" for _ in _TABLE) + "|"
    lines = [
        f"tokenline bench load  {results['date']}  ({results['command']})",
        f"model {results['model']}, target {results['target']}, {results['workload']}, "
        f"max_tokens {results['max_tokens']}, load average before {results['loadavg_before']}",
        "",
        header,
        rule,
    ]
    for row in results["rows"]:
        cells = ["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in _TABLE]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """TTFT and ITL p50/p99 and tokens/s against users: one PNG each and all three side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise PlotError("plots need matplotlib: pip install -e '.[bench]'") from error

    rows: Sequence[Mapping[str, Any]] = results["rows"]
    users = [row["users"] for row in rows]
    panels: tuple[tuple[str, str, str, tuple[tuple[str, str], ...]], ...] = (
        ("load_ttft.png", "time to first token", "ms", (("ttft_p50_ms", "p50"), ("ttft_p99_ms", "p99"))),
        ("load_itl.png", "inter-token latency", "ms", (("itl_p50_ms", "p50"), ("itl_p99_ms", "p99"))),
        ("load_tokens_per_s.png", "output throughput", "tokens/s", (("tokens_per_s", "tokens/s"),)),
    )
    title = f"tokenline bench load, {results['date'][:10]}"
    written: list[Path] = []

    def draw(axes: Any, name: str, unit: str, series: Sequence[tuple[str, str]]) -> None:
        for key, label in series:
            axes.plot(users, [row.get(key) for row in rows], marker="o", label=label)
        axes.set_xscale("log", base=2)
        axes.set_xticks(users, [str(u) for u in users])
        axes.set_xlabel("concurrent streams (locust users)")
        axes.set_ylabel(unit)
        axes.set_title(name)
        axes.grid(True, alpha=0.3)
        if len(series) > 1:
            axes.legend()

    for filename, name, unit, series in panels:
        figure, axes = plt.subplots(figsize=(5, 3.6))
        draw(axes, name, unit, series)
        figure.suptitle(title, fontsize=9)
        figure.tight_layout()
        figure.savefig(out_dir / filename, dpi=110)
        plt.close(figure)
        written.append(out_dir / filename)
    figure, all_axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for axes, (_, name, unit, series) in zip(all_axes, panels, strict=True):
        draw(axes, name, unit, series)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(out_dir / "load.png", dpi=100)
    plt.close(figure)
    written.append(out_dir / "load.png")
    return written
