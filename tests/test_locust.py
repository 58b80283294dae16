"""The locustfile against the real stack (a short headless run), and how it counts latencies."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.load_sweep import LoadPlan, parse_run_time, parse_users, summarize_run
from loadtest.stream_timing import stream_timing
from services.errors import InvalidParameterError
from tests.serving_stack import MODEL_NAME, Stack

LOCUSTFILE = Path(__file__).resolve().parents[1] / "loadtest" / "locustfile.py"
ENTRIES = ("GenerateStream", "TTFT", "ITL", "TPOT")
RUN_TIME_S = 20
USERS = 4
MAX_TOKENS = 16


def test_a_message_with_several_tokens_is_one_gap() -> None:
    # Start at 10.0; messages at 10.1 (1 token), 10.3 (3 tokens), 10.3 (no token: the
    # finish message), 10.4 (1 token); the stream closes at 10.5.
    timing = stream_timing(10.0, [(10.1, 1), (10.3, 3), (10.3, 0), (10.4, 1)], 10.5)
    assert timing.tokens == 5
    assert timing.ttft_s == pytest.approx(0.1)
    assert timing.itls_s == pytest.approx((0.2, 0.1))  # two gaps, no zero gaps for the batch of 3
    assert timing.e2e_s == pytest.approx(0.5)
    assert timing.tpot_s == pytest.approx((0.5 - 0.1) / 4)


def test_tpot_and_itl_need_two_tokens() -> None:
    one = stream_timing(0.0, [(0.2, 1)], 0.3)
    assert (one.ttft_s, one.itls_s, one.tpot_s) == (pytest.approx(0.2), (), None)
    none = stream_timing(0.0, [(0.2, 0)], 0.3)
    assert (none.tokens, none.ttft_s, none.tpot_s) == (0, None, None)


def test_headless_locust_run_reports_every_entry_without_failures(stack: Stack, tmp_path: Path) -> None:
    samples_json = tmp_path / "samples.json"
    env = {
        **os.environ,
        "TOKENLINE_API_KEY": stack.api_key,
        "TOKENLINE_MODEL": MODEL_NAME,
        "TOKENLINE_MAX_TOKENS": str(MAX_TOKENS),
        "TOKENLINE_LOCUST_JSON": str(samples_json),
    }
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--host", stack.target, "--users", str(USERS), "--spawn-rate", str(USERS),
        "--run-time", f"{RUN_TIME_S}s", "--stop-timeout", "60", "--only-summary",
        "--csv", str(tmp_path / "locust"),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIME_S + 180)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"locust exited with {run.returncode}:\n{output[-4000:]}"

    with (tmp_path / "locust_stats.csv").open() as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    for name in ENTRIES:
        assert name in rows, f"no {name} entry in locust's stats: {sorted(rows)}"
        assert int(rows[name]["Request Count"]) > 0, f"{name} has no samples"
        assert int(rows[name]["Failure Count"]) == 0
    assert int(rows["Aggregated"]["Failure Count"]) == 0

    summary = json.loads(samples_json.read_text())
    samples = summary["samples_ms"]
    streams = summary["requests"]
    assert summary["failures"] == 0
    assert streams > 0 and all(samples[name] for name in ENTRIES)
    # ignore_eos: every stream carries MAX_TOKENS tokens, so one TTFT and one TPOT each,
    # and at most MAX_TOKENS - 1 gaps each (fewer when a message carried several tokens).
    assert summary["output_tokens"] == streams * MAX_TOKENS
    assert len(samples["TTFT"]) == len(samples["TPOT"]) == streams
    assert len(samples["ITL"]) <= streams * (MAX_TOKENS - 1)
    assert summary["tokens_per_s"] == pytest.approx(summary["output_tokens"] / summary["wall_s"])
    assert summary["tokens_per_s"] > 0
    assert f"{summary['output_tokens']} output tokens in" in output


def test_sweep_arguments_are_parsed_and_checked() -> None:
    assert parse_users("1,4,16,64") == (1, 4, 16, 64)
    assert (parse_run_time("30s"), parse_run_time("2m"), parse_run_time("45")) == (30.0, 120.0, 45.0)
    for bad_users in ("1,x", "0", ""):
        with pytest.raises(InvalidParameterError) as error:
            LoadPlan(parse_users(bad_users), 30.0)
        assert error.value.field == "users"
    with pytest.raises(InvalidParameterError) as error:
        parse_run_time("soon")
    assert error.value.field == "run_time"


def test_sweep_row_takes_exact_percentiles_of_the_samples() -> None:
    samples = {
        "GenerateStream": [100.0, 200.0],
        "TTFT": [10.0, 30.0],
        "ITL": [1.0, 2.0, 3.0, 4.0],
        "TPOT": [5.0],
    }
    summary = {"users": 2, "requests": 2, "failures": 0, "output_tokens": 64, "wall_s": 4.0,
               "tokens_per_s": 16.0, "samples_ms": samples}  # fmt: skip
    row = summarize_run(summary)
    assert (row["ttft_p50_ms"], row["ttft_p99_ms"]) == (20.0, pytest.approx(29.8))
    assert (row["itl_p50_ms"], row["tpot_p99_ms"], row["e2e_p50_ms"]) == (2.5, 5.0, 150.0)
    assert (row["tokens_per_s"], row["failures"]) == (16.0, 0)
