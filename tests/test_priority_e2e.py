"""Priority holds across the queue, end to end: a priority-0 request sent behind a hundred queued
priority-10 requests starts before nearly all of them.

The shared stack's admission bound (64) cannot queue a hundred, and Ray Serve runs one Serve
instance per Ray cluster, so this module runs a small stack of its own the way a user does:
`tokenline serve` in a child process (its own local Ray), one engine replica with two batch
slots, over a Redis server the test owns so that it can see what was accepted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis
import yaml

from services.proto.tokenline.v1 import generation_pb2 as pb
from services.proto.tokenline.v1 import generation_pb2_grpc as pb_grpc
from services.queue import RedisServer
from services.queue.keys import ENGINE_GROUP, QueueKeys
from tests.serving_stack import MODEL_NAME, free_port, wait_ready

BACKGROUND = 100
MAX_TOKENS = 64  # long enough that the queue is still full when the urgent request comes


@pytest.fixture(scope="module")
def small_stack(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(gRPC target, Redis URL) of a one-replica stack with two batch slots."""
    workdir = tmp_path_factory.mktemp("priority-stack")
    with RedisServer() as redis_server:
        port = free_port()
        config = {
            "models": [
                {
                    "name": MODEL_NAME,
                    "path": str(demo_model_dir),
                    "engine_replicas": 1,
                    "engine": {"max_num_seqs": 2, "max_num_batched_tokens": 256, "kv_cache_memory_gib": 0.25},
                }
            ],
            "redis_url": redis_server.url,
            "grpc_port": port,
            "queue": {"max_queue_depth": 4 * BACKGROUND},
            "auth": {"enabled": False},
        }
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        # The child starts a Ray of its own, whatever address this process's Ray left in the environment.
        env = {**os.environ, "RAY_ADDRESS": "local"}
        env["XDG_CONFIG_HOME"] = str(workdir)
        tokenline = Path(sys.executable).with_name("tokenline")
        log = (workdir / "serve.log").open("w")
        child = subprocess.Popen(
            [str(tokenline), "serve", "--config", str(workdir / "config.yaml")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            target = f"127.0.0.1:{port}"
            wait_ready(target, api_key="", timeout_s=240)
            yield target, redis_server.url
        finally:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            log.close()


def test_priority_0_request_sent_behind_100_queued_priority_10_ones_starts_before_them(
    small_stack: tuple[str, str],
) -> None:
    target, redis_url = small_stack
    first_token_at: dict[str, float] = {}
    finish: dict[str, int] = {}
    background = [f"bg-{i:03}" for i in range(BACKGROUND)]
    accepted_markers = [QueueKeys().idempotency(request_id) for request_id in background]

    def stream(stub: pb_grpc.GenerationStub, request_id: str, priority: int) -> None:
        sampling = pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        request = pb.GenerateRequest(request_id=request_id, text="12+35=", sampling=sampling)
        request.priority = priority
        for message in stub.GenerateStream(request, timeout=300):
            first_token_at.setdefault(request_id, time.monotonic())
            if message.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                finish[request_id] = message.finish_reason

    with grpc.insecure_channel(target) as channel, ThreadPoolExecutor(BACKGROUND + 1) as pool:
        stub = pb_grpc.GenerationStub(channel)
        futures = [pool.submit(stream, stub, request_id, 10) for request_id in background]
        with redis.Redis.from_url(redis_url) as raw:
            deadline = time.monotonic() + 120
            while (accepted := raw.exists(*accepted_markers)) < BACKGROUND:
                assert time.monotonic() < deadline, f"only {accepted} background requests accepted"
                failed = [f.exception() for f in futures if f.done() and f.exception()]
                assert not failed, f"a background call failed: {failed[0]}"
                time.sleep(0.01)
            futures.append(pool.submit(stream, stub, "urgent", 0))
            # What no engine had claimed when 'urgent' reached the queue (its idempotency marker
            # is written by the enqueue script), not when it was sent: the ingress's time to take
            # it in is no part of the queue's order. Read from the queue, not from first tokens at
            # this client: with a hundred streams opening, a request the engine already runs may
            # not have shown a token here yet.
            while not raw.exists(QueueKeys().idempotency("urgent")):
                assert time.monotonic() < deadline, "'urgent' was not accepted"
                time.sleep(0.002)
            queued = unclaimed(raw, QueueKeys().for_model(MODEL_NAME).band(10))
        for future in futures:
            future.result()
    assert set(finish.values()) == {pb.FINISH_REASON_LENGTH} and len(finish) == BACKGROUND + 1
    overtaken = [request_id for request_id in queued if first_token_at[request_id] > first_token_at["urgent"]]
    print(f"'urgent' sent behind {len(queued)} requests not yet started; it overtook {len(overtaken)}")
    assert len(queued) >= BACKGROUND // 2, "the engine drained the queue before 'urgent' was sent"
    # What was unclaimed then is claimed after 'urgent' (claims take the most urgent band first);
    # the slack covers claims between the enqueue and the read above, and 'urgent's own claim
    # taking a second request into the same step.
    assert len(queued) - len(overtaken) <= 4, f"'urgent' overtook only {len(overtaken)} of {len(queued)}"


def unclaimed(raw: redis.Redis, band: str) -> list[str]:
    """Request ids of the band's entries the engines' group has not been handed yet."""
    (group,) = [g for g in raw.xinfo_groups(band) if g["name"] == ENGINE_GROUP.encode()]
    last_delivered = group["last-delivered-id"].decode()
    return [fields[b"id"].decode() for _, fields in raw.xrange(band, min=f"({last_delivered}")]
