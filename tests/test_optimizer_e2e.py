"""quantize -> gate -> publish -> serve, end to end on the demo model, the way a user runs it:
`tokenline optimize --publish` (the optimizer Ray actor) and `tokenline serve --variants`, each
its own process with its own Ray; real Redis; a gRPC request to demo@int8 streams the answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from services.client import TokenlineClient
from services.ingress.api_keys import ApiKeyStore
from services.proto.tokenline.v1 import generation_pb2 as pb
from tests.serving_stack import free_port, wait_ready

TOKENLINE = [sys.executable, "-m", "services.cli"]


def test_optimize_publish_then_serve_the_variant_over_grpc(
    redis_url: str, demo_model_dir: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    optimize = subprocess.run(
        [
            *TOKENLINE,
            "optimize",
            "--model",
            "demo",
            "--recipe",
            "int8",
            "--publish",
            "--redis-url",
            redis_url,
            "--variants-dir",
            str(tmp_path / "variants"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert optimize.returncode == 0, optimize.stderr[-3000:]
    lines = optimize.stdout.strip().splitlines()
    variant_dir = Path(lines[-1])
    assert variant_dir == tmp_path / "variants" / "demo@int8" and (variant_dir / "config.json").is_file()
    assert any(line.startswith("top1_agreement") and line.rstrip().endswith("pass") for line in lines)
    assert "[6/6] publish" in optimize.stderr  # a progress line per stage, the last one included

    with ApiKeyStore(redis_url) as keys:
        api_key, _ = keys.create("tester")
    port = free_port()
    server = subprocess.Popen(
        [*TOKENLINE, "serve", "--redis-url", redis_url, "--variants", "demo@int8", "--grpc-port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        target = f"127.0.0.1:{port}"
        wait_ready(target, api_key, timeout_s=240)
        with TokenlineClient(target, api_key) as client:
            models = {m.name: m for m in client.list_models()}
            assert set(models) == {"demo", "demo@int8"}
            variant = models["demo@int8"]
            assert variant.variant_of == "demo" and variant.recipe == "int8"
            assert variant.gate["perplexity_ratio"] <= 1.01 and variant.gate["top1_agreement"] >= 0.97
            assert not models["demo"].gate
            request = pb.GenerateRequest(
                model="demo@int8", text="12+35=", sampling=pb.SamplingParams(max_tokens=8, temperature=0.0)
            )
            messages = list(client.stream(request))
        assert "".join(m.text for m in messages) == "47"
        # Streamed as the engine produced it (tokens of one step may share a message), ended by EOS.
        assert messages[-1].finish_reason == pb.FINISH_REASON_STOP
        assert sum(len(m.token_ids) for m in messages) == messages[-1].usage.completion_tokens == 3
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
