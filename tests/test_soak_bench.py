"""The pure parts of `tokenline bench soak` and of the overload test's helpers: slopes,
memory series, process roles, retry hints, the result document and its table, argument
checks. No Ray, no Redis, no model: well under a second."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from loadtest.load_driver import LoadRequest, LoadTally, retry_after_s
from loadtest.report import write_json
from loadtest.rss import MIB, Series, least_squares_slope, stack_role
from loadtest.soak import OUTPUT_LENGTHS, SoakPlan, soak_command
from loadtest.soak_report import assemble, format_table
from services.cli import main
from services.errors import InvalidParameterError


def test_least_squares_slope() -> None:
    assert least_squares_slope([(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) == pytest.approx(2.0)
    # noise around a flat line: slope 0, not the difference of the end points
    assert least_squares_slope([(0.0, 10.0), (1.0, 12.0), (2.0, 8.0), (3.0, 10.0)]) == pytest.approx(-0.4)
    assert least_squares_slope([(0.0, 4.0), (5.0, 4.0)]) == 0.0
    with pytest.raises(ValueError):
        least_squares_slope([(1.0, 1.0)])
    with pytest.raises(ValueError):
        least_squares_slope([(1.0, 1.0), (1.0, 2.0)])


def test_series_summary_leaves_the_warm_up_out_of_the_slope() -> None:
    # 100 MiB that jumps to 200 MiB in the first minute, then rises 1 MiB per minute
    points = [(0.0, 100 * MIB), (30.0, 200 * MIB)] + [(60.0 * m, (200 + m - 1) * MIB) for m in range(1, 6)]
    series = Series("ingress", 42, points)
    summary = series.summary(warmup_s=60.0)
    assert summary["start_mib"] == 100.0
    assert summary["warm_mib"] == 200.0
    assert summary["end_mib"] == summary["max_mib"] == 204.0
    assert summary["slope_mib_per_min"] == pytest.approx(1.0)
    assert summary["samples"] == 7
    assert series.name == "ingress (pid 42)"
    assert series.at_or_after(31.0) == (60.0, 200 * MIB)
    assert series.at_or_after(1000.0) is None
    assert Series("ingress", 42, points[:3]).summary(warmup_s=60.0)["slope_mib_per_min"] is None
    assert Series("redis used_memory", None, points).name == "redis used_memory"


@pytest.mark.parametrize(
    ("cmdline", "role"),
    [
        (["ray::ServeReplica:tokenline:ingress"], "ingress"),
        (["ray::ServeReplica:tokenline:engine-demo.handle_request"], "engine-demo"),
        (["ray::ProxyActor"], "proxy"),
        (["ray::ServeController.listen_for_change"], "controller"),
        (["/venv/lib/ray/core/src/ray/raylet/raylet", "--node_ip_address=1"], "raylet"),
        (["/venv/lib/ray/core/src/ray/gcs/gcs_server", "--x"], "gcs_server"),
        (["/usr/bin/redis-server 127.0.0.1:6379"], "redis-server"),
        (["ray::IDLE"], None),
        (["/venv/bin/python", "-m", "pytest"], None),
        ([], None),
    ],
)
def test_stack_roles(cmdline: list[str], role: str | None) -> None:
    assert stack_role(cmdline) == role


def test_retry_hint_is_read_from_the_details() -> None:
    assert retry_after_s("queue for model 'demo' is full (64/64); retry-after-ms=1000") == 1.0
    assert retry_after_s("retry-after-ms=250") == 0.25
    assert retry_after_s("queue full") is None
    assert retry_after_s(None) is None


def test_tally_counts_differing_outputs_per_request_kind() -> None:
    a, b = LoadRequest("1+2=", 4), LoadRequest("Count: 3", 4)
    tally = LoadTally(completed=3, tokens=12, started=10.0, ended=14.0)
    tally.outputs = {a: Counter({(1, 2, 3, 4): 2}), b: Counter({(5, 6, 7, 8): 1, (5, 6, 7, 9): 1})}
    assert tally.disagreements() == {b: 2}
    assert tally.tokens_per_s == 3.0
    tally.fail("UNAVAILABLE", "queue unavailable")
    assert tally.failures == 1 and tally.failure_examples == ["UNAVAILABLE: queue unavailable"]
    message = a.message()
    assert message.text == "1+2=" and message.sampling.max_tokens == 4
    assert message.sampling.temperature == 0.0 and message.sampling.ignore_eos


def test_result_document_and_table(tmp_path: Path) -> None:
    tally = LoadTally(completed=40, refused=2, tokens=1600, started=0.0, ended=80.0)
    tally.refusal_wait_s_total, tally.refusal_wait_s_max = 3.0, 2.0
    series = [
        Series(
            "engine-demo", 7, [(0.0, 900 * MIB), (60.0, 910 * MIB), (120.0, 911 * MIB), (180.0, 912 * MIB)]
        ),
        Series(
            "redis used_memory", None, [(0.0, 1 * MIB), (60.0, 2 * MIB), (120.0, 3 * MIB), (180.0, 4 * MIB)]
        ),
    ]
    context = {"minutes": 3, "concurrency": 8, "cpu_count": 2, "sample_every_s": 5.0}
    context["workload"] = {"description": "demo prompts"}
    results = assemble(context=context, tally=tally, series=series, warmup_s=30.0)
    assert results["requests"]["completed"] == 40 and results["requests"]["refused"] == 2
    assert results["requests"]["tokens_per_s"] == 20.0
    (engine,) = results["processes"]
    assert (engine["role"], engine["pid"], engine["start_mib"], engine["end_mib"]) == (
        "engine-demo",
        7,
        900,
        912,
    )
    assert engine["slope_mib_per_min"] == pytest.approx(1.0)
    assert results["gauges"][0]["slope_mib_per_min"] == pytest.approx(1.0)
    table = format_table(results)
    assert "engine-demo" in table and "912.0" in table and "+1.00" in table
    assert "40 completed, 2 refused, 0 failed" in table and "20.0 tok/s" in table
    assert "1.50 s after the call on average (max 2.00 s)" in table
    write_json(results, tmp_path / "soak.json")
    assert json.loads((tmp_path / "soak.json").read_text())["processes"][0]["pid"] == 7


def test_soak_plan_checks_its_arguments() -> None:
    plan = SoakPlan(minutes=10)
    assert plan.concurrency == 8 and plan.duration_s == 600.0 and plan.warmup_s == 120.0
    assert SoakPlan(minutes=1).warmup_s == 12.0
    kinds = plan.requests([f"{n}+1=" for n in range(6)])
    assert len(set(kinds)) == 6 and {k.max_tokens for k in kinds} == set(OUTPUT_LENGTHS)
    for field, value, kwargs in [
        ("minutes", 0, {"minutes": 0}),
        ("minutes", -1.0, {"minutes": -1.0}),
        ("minutes", float("nan"), {"minutes": float("nan")}),
        ("minutes", 1e6, {"minutes": 1e6}),
        ("concurrency", 0, {"minutes": 1, "concurrency": 0}),
        ("concurrency", 2.5, {"minutes": 1, "concurrency": 2.5}),
    ]:
        with pytest.raises(InvalidParameterError) as caught:
            SoakPlan(**kwargs)  # type: ignore[arg-type]
        assert caught.value.field == field
        assert caught.value.value == value or math.isnan(value)


def test_bad_arguments_exit_2_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "soak", "--minutes", "0"]) == 2
    assert "minutes" in capsys.readouterr().err
    assert main(["bench", "soak", "--minutes", "1", "--concurrency", "-3"]) == 2
    assert "concurrency" in capsys.readouterr().err
    assert soak_command(5, 0, None) == 2
    with pytest.raises(SystemExit):  # argparse: --minutes is required
        main(["bench", "soak"])
