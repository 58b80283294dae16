"""Smoke run of `tokenline bench engine`'s code paths: tiny model, 3 requests, seconds."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.bench_model import TINY_MODEL
from loadtest.engine_bench import BenchPlan, run_plan
from loadtest.ours import EngineSettings
from loadtest.workload import WorkloadSpec

REQUIRED_KEYS = {
    "ours_tok_s",
    "hf_static_tok_s",
    "hf_cb_tok_s",
    "ratio_vs_hf_static",
    "ratio_vs_hf_cb",
    "workload",
    "max_batch_size",
    "model",
    "torch_threads",
    "date",
    "decode_b1_tok_s",
    "copy_bandwidth_gb_s",
    "decode_b1_roofline_ratio",
    "targets",
}


def tiny_plan() -> BenchPlan:
    return BenchPlan(
        workload=WorkloadSpec(num_requests=3, prompt_len_range=(16, 48), output_len_range=(4, 12), seed=3),
        throughput_model=TINY_MODEL,
        decode_model=TINY_MODEL,
        engine=EngineSettings(max_batch_size=2, max_num_batched_tokens=64, kv_cache_memory_gib=0.01),
        decode_prompt_len=8,
        decode_steps=8,
        bandwidth_buffer_bytes=4 << 20,
        quick=True,
    )


def test_bench_engine_smoke(tmp_path: Path) -> None:
    json_path = tmp_path / "bench.json"
    results = run_plan(tiny_plan(), json_path, log=lambda _: None)

    on_disk = json.loads(json_path.read_text())
    missing = REQUIRED_KEYS - on_disk.keys()
    assert not missing, missing
    asked = on_disk["workload"]["output_lengths"]
    assert len(asked) == 3
    assert on_disk["workload"]["total_output_tokens"] == sum(asked)
    for name in ("ours", "hf_static", "hf_cb"):
        contender = on_disk["contenders"][name]
        assert contender["tokens_per_request"] == asked, name
        assert contender["output_tokens"] == sum(asked), name
        assert contender["tok_s"] > 0, name
    assert on_disk["max_batch_size"] == 2
    assert on_disk["decode_b1_tok_s"] > 0
    assert on_disk["copy_bandwidth_gb_s"] > 0
    assert results["ratio_vs_hf_static"] == on_disk["ratio_vs_hf_static"]


def test_bench_against_vllm_without_vllm_says_so_and_runs_ours(tmp_path: Path) -> None:
    from loadtest.against_vllm import run_against_vllm
    from loadtest.bench_model import build_checkpoint

    model = build_checkpoint(TINY_MODEL, tmp_path / "tiny", seed=0)
    messages: list[str] = []
    results = run_against_vllm(
        model.path,
        "float32",
        1,
        tmp_path / "against.json",
        vllm_python=tmp_path / "no-such-python",
        log=messages.append,
        workload_spec=WorkloadSpec(num_requests=3, prompt_len_range=(8, 24), output_len_range=(4, 8), seed=1),
        settings=EngineSettings(max_batch_size=2, max_num_batched_tokens=64, kv_cache_memory_gib=0.01),
        search_vllm=False,
    )
    assert any("vLLM not found" in m and "no-such-python" in m for m in messages), messages
    on_disk = json.loads((tmp_path / "against.json").read_text())
    assert set(on_disk["contenders"]) == {"ours"}
    assert on_disk["contenders"]["ours"]["output_tokens"] == sum(on_disk["workload"]["output_lengths"])
    assert "ratio_vs_vllm" not in results
