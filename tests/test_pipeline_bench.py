"""The pure parts of `tokenline bench pipeline`: statistics, budgets, the result document.

No Ray, no Redis, no model, no timing: the e2e suite runs the stack; this checks the
arithmetic and the shape of what the benchmark writes, in well under a second.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from loadtest.pipeline_plan import CONCURRENCIES, Workload, demo_prompts, output_budget, plan_for
from loadtest.pipeline_report import HEADLINE_KEYS, STAGES, assemble, format_table
from loadtest.proc_cpu import cpu_delta, process_label
from loadtest.redis_commands import commands_per_request
from loadtest.report import write_json
from loadtest.stats import RequestTrace, percentile, summarize, token_agreement


def trace(start: float, *times: float, per_message: int = 1) -> RequestTrace:
    out = RequestTrace(start=start)
    for index in range(0, len(times), per_message):
        group = times[index : index + per_message]
        out.add(group[0], [7] * len(group))
    return out


def test_percentile_matches_numpy_linear() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_trace_ttft_and_gaps() -> None:
    t = trace(1.0, 1.5, 1.75, 2.25)
    assert t.ttft_s == pytest.approx(0.5)
    assert t.itls_s == pytest.approx([0.25, 0.5])
    assert t.messages == 3
    bundled = RequestTrace(start=0.0)
    bundled.add(1.0, [1, 2, 3])  # one message, three tokens: no gap (not two gaps of zero)
    assert bundled.itls_s == []
    assert bundled.token_ids == [1, 2, 3]
    bundled.add(1.5, [4])
    assert bundled.itls_s == pytest.approx([0.5])


def test_summarize_throughput_and_latency() -> None:
    # the second request gets its three tokens in one message at 0.2
    traces = [trace(0.0, 0.1, 0.2, 0.3), trace(0.0, 0.2, 0.3, 0.4, per_message=3)]
    summary = summarize(traces)
    assert summary["requests"] == 2
    assert summary["output_tokens"] == 6
    assert summary["wall_s"] == pytest.approx(0.3)
    assert summary["tok_s"] == pytest.approx(20.0)
    assert summary["ttft_p50_ms"] == pytest.approx(150.0)
    assert summary["tokens_per_message"] == pytest.approx(6 / 4)
    # gaps between messages: 100, 100 (first); none in the one message of three tokens
    assert summary["itl_p50_ms"] == pytest.approx(100.0)
    assert summary["itl_mean_ms"] == pytest.approx(100.0)
    assert summary["tpot_p50_ms"] == pytest.approx(50.0)  # 100 ms per token, and 0 ms per token
    with pytest.raises(ValueError):
        summarize([trace(0.0, 0.1)])


def test_output_budget_fits_the_context() -> None:
    assert output_budget(48, 512, 10) == 48
    assert output_budget(48, 64, 20) == 43  # 64 - 20 - 1
    with pytest.raises(ValueError):
        output_budget(48, 12, 10)


def test_demo_prompts_are_seeded_and_include_addition() -> None:
    prompts = demo_prompts(30, seed=3)
    assert prompts == demo_prompts(30, seed=3)
    assert prompts != demo_prompts(30, seed=4)
    assert all(prompts)
    assert re.fullmatch(r"\d{1,2}\+\d{1,2}=", prompts[0])


def test_token_agreement() -> None:
    assert token_agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == 1.0
    assert token_agreement([[1, 2, 3, 4]], [[1, 9, 3, 4]]) == 0.25
    assert token_agreement([], []) == 1.0


def test_plan_quick_changes_only_request_counts() -> None:
    quick, full = plan_for(True), plan_for(False)
    assert set(quick.requests) == set(full.requests) == set(CONCURRENCIES)
    assert all(quick.requests[c] <= full.requests[c] for c in CONCURRENCIES)
    assert quick.output_tokens == full.output_tokens


def test_process_labels() -> None:
    assert process_label(["ray::ServeReplica:tokenline:ingress"]) == "ray::ServeReplica:tokenline:ingress"
    assert process_label(["ray::ProxyActor   "]) == "ray::ProxyActor"
    running_a_task = ["ray::ServeReplica:app:engine-demo.handle_request"]
    assert process_label(running_a_task) == "ray::ServeReplica:app:engine-demo"
    assert process_label(["ray::ServeController.listen_for_change"]) == "ray::ServeController"
    assert process_label(["/usr/bin/redis-server", "127.0.0.1:6379"]) == "redis-server"
    assert process_label(["/venv/bin/python3", "/x/log_monitor.py", "--a"]) == "python log_monitor.py"
    assert process_label(["python", "-m", "loadtest.x"]) == "python -m loadtest.x"
    assert process_label([]) == "?"


def test_cpu_delta_sums_by_label() -> None:
    before = {1: ("a", 1.0), 2: ("b", 5.0)}
    after = {1: ("a", 2.0), 2: ("b", 5.5), 3: ("a", 0.5)}
    delta = cpu_delta(before, after, tokens=100, wall_s=2.0)
    assert delta["total_cpu_s"] == pytest.approx(2.0)
    assert list(delta["processes"]) == ["a", "b"]
    assert delta["processes"]["a"]["cpu_s"] == pytest.approx(1.5)
    assert delta["processes"]["a"]["cpu_ms_per_token"] == pytest.approx(15.0)


def synthetic_results() -> dict[str, object]:
    in_process = {
        1: summarize([trace(0.0, 0.005, 0.007, 0.009)]),
        16: summarize([trace(0.0, 0.010, 0.016, 0.022), trace(0.0, 0.010, 0.016, 0.022)]),
    }
    stack = {
        1: summarize([trace(0.0, 0.020, 0.023, 0.026)]),
        16: summarize([trace(0.0, 0.030, 0.040, 0.050), trace(0.0, 0.030, 0.040, 0.050)]),
    }
    samples = {name: [0.001, 0.002, 0.003] for name in STAGES}
    plan = plan_for(True)
    return assemble(
        context={
            "quick": True,
            "cpu_count": 2,
            "torch_version": "x",
            "model": {"path": "/m", "max_context_length": 64, "vocab_size": 20},
            "engine_settings": {"num_threads": 1, "max_num_seqs": 32, "max_num_batched_tokens": 512},
            "workload": Workload({0: ["1+1="]}, {0: [[1, 2, 3]]}, 3).describe(plan),
        },
        in_process=in_process,
        stack=stack,
        samples=samples,
        extra={
            "stack_engine_loop": {"steps": 10, "ms_per_step": 3.0, "how": "h"},
            # 1,000 tokens in 2 s; the stack (all but the engine and the client) 0.5 CPU s of it
            "cpu_during_stack_c16": cpu_delta(
                {
                    1: ("this process (benchmark client)", 0.0),
                    2: ("ray::ServeReplica:app:engine-demo", 0.0),
                    3: ("ray::ServeReplica:app:ingress", 0.0),
                    4: ("redis-server", 0.0),
                },
                {
                    1: ("this process (benchmark client)", 0.3),
                    2: ("ray::ServeReplica:app:engine-demo", 1.5),
                    3: ("ray::ServeReplica:app:ingress", 0.4),
                    4: ("redis-server", 0.1),
                },
                tokens=1000,
                wall_s=2.0,
            ),
            # at rest the stack spends 50 ms per s: at 500 tokens per s, 100 us of each token
            "cpu_at_rest": cpu_delta(
                {2: ("ray::ServeReplica:app:engine-demo", 0.0), 3: ("ray::ServeReplica:app:ingress", 0.0)},
                {2: ("ray::ServeReplica:app:engine-demo", 0.2), 3: ("ray::ServeReplica:app:ingress", 0.5)},
                tokens=0,
                wall_s=10.0,
            ),
            "redis_commands_c16": commands_per_request({"xadd": 10}, {"xadd": 106, "evalsha": 6}, 2),
        },
        agreement=1.0,
    )


def test_result_document_keys_targets_and_json(tmp_path: Path) -> None:
    results = synthetic_results()
    assert set(HEADLINE_KEYS) <= results.keys()
    for key in ("stages", "latency_budgets", "targets", "workload", "in_process", "stack"):
        assert key in results
    assert results["greedy_agreement"] == 1.0
    assert set(results["stages"]) == set(STAGES)  # type: ignore[call-overload]
    assert results["ttft_p50_added_ms"] == pytest.approx(15.0)
    assert results["itl_p50_added_ms"] == pytest.approx(1.0)
    assert results["ratio_throughput_c16"] == pytest.approx((6 / 0.05) / (6 / 0.022))
    targets = results["targets"]
    assert targets["ttft_p50_added_ms"]["met"] is True  # type: ignore[index]  # 15 <= 15
    assert targets["itl_p50_added_ms"]["met"] is True  # type: ignore[index]
    assert targets["ratio_throughput_c16"]["met"] is False  # type: ignore[index]
    assert results["stack_cpu_us_per_token"] == pytest.approx(500.0)
    assert results["stack_cpu_at_rest_ms_per_s"] == pytest.approx(50.0)
    assert results["stack_cpu_floor_us_per_token"] == pytest.approx(100.0)
    assert results["stack_cpu_streaming_us_per_token"] == pytest.approx(400.0)
    assert targets["stack_cpu_us_per_token"]["met"] is False  # type: ignore[index]  # 500 > 300
    budget = results["latency_budgets"]["ttft_p50_added_ms"]  # type: ignore[index]
    assert sum(budget.values()) == pytest.approx(15.0)

    path = tmp_path / "out" / "pipeline.json"
    write_json(results, path)
    on_disk = json.loads(path.read_text())
    assert set(HEADLINE_KEYS) <= on_disk.keys()
    assert on_disk["stack"]["16"]["tok_s"] == pytest.approx(results["throughput_stack_c16_tok_s"])

    table = format_table(on_disk)
    assert "ratio_throughput_c16" in table and "MISSED" in table
    commands_line = "Redis commands per request during the c=16 run (inside scripts included): 51.0"
    assert f"{commands_line} (xadd 48.00, evalsha 3.00" in table
    assert all(name in table for name in STAGES)
    assert "stack CPU (all but engines and the client): 500 us/token" in table
    assert "50.0 ms of CPU per s: 100 us/token at the c=16 throughput; streaming adds 400" in table
    assert "at rest, ms of CPU per s: ray::ServeReplica:app:ingress 50.0" in table
