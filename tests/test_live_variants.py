"""Publishing a variant into a running app: `tokenline optimize --publish` against the app's Redis
and Ray makes the app serve MODEL@RECIPE, while the ingress, tokenizer, detokenizer and engine
replicas it already runs keep running (same replicas, same processes) and the streams in flight
finish. Real Redis, real Ray, real gRPC, the demo model."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import ray
from ray import serve
from ray.serve.context import _get_global_client

from services.client import TokenlineClient
from services.proto.tokenline.v1 import generation_pb2 as pb
from services.queue.registry import VariantRegistry
from services.queue.served_variants import LiveVariantsConfig
from services.variant_watcher import variant_app_name
from tests.serving_stack import Stack, stack_config, start_stack
from tests.test_optimizer_e2e import TOKENLINE

OWN_STACK = True  # publishes into its own app (see conftest.pytest_collection_modifyitems)
VARIANT = "demo@int8"


@dataclass(frozen=True)
class Finished:
    started: float
    ended: float
    text: str
    finish_reason: int


@pytest.fixture(scope="module")
def live_stack(demo_model_dir: Path) -> Iterator[Stack]:
    config = stack_config(str(demo_model_dir), engine_replicas=1).model_copy(
        update={"live_variants": LiveVariantsConfig(poll_s=0.5, cache_ttl_s=1.0)}
    )
    yield from start_stack(config)


def answer_request(model: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=model, text="12+35=", sampling=pb.SamplingParams(max_tokens=8, temperature=0.0)
    )


def replicas(app_name: str) -> dict[str, set[tuple[str, str, int]]]:
    """(replica id, actor id, pid) of every replica of every deployment of a Serve application."""
    details: dict[str, Any] = _get_global_client().get_serve_details()
    deployments = details["applications"][app_name]["deployments"]
    return {
        name: {
            (replica["replica_id"], replica["actor_id"], replica["pid"]) for replica in deployment["replicas"]
        }
        for name, deployment in deployments.items()
    }


class Traffic:
    """Streams to the source model, one after another on each thread, until stopped."""

    def __init__(self, stack: Stack, threads: int = 2) -> None:
        self._stack = stack
        self._stop = threading.Event()
        self.finished: list[Finished] = []
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        with TokenlineClient(self._stack.target, self._stack.api_key) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    messages = list(client.stream(answer_request("demo")))
                except grpc.RpcError as error:
                    self.errors.append(error)
                    continue
                text = "".join(m.text for m in messages)
                self.finished.append(Finished(started, time.monotonic(), text, messages[-1].finish_reason))

    @contextlib.contextmanager
    def running(self) -> Iterator[Traffic]:
        for thread in self._threads:
            thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            for thread in self._threads:
                thread.join(timeout=60)


def publish(stack: Stack, variants_dir: Path) -> None:
    command = [
        *TOKENLINE,
        "optimize",
        "--model",
        "demo",
        "--recipe",
        "int8",
        "--publish",
        "--redis-url",
        stack.config.redis_url,
        "--key-prefix",
        stack.config.queue.key_prefix,
        "--ray-address",
        ray.get_runtime_context().gcs_address,
        "--variants-dir",
        str(variants_dir),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(variants_dir / VARIANT)


def listed(client: TokenlineClient) -> dict[str, pb.ModelInfo]:
    return {model.name: model for model in client.list_models()}


def wait_listed(client: TokenlineClient, present: bool, timeout_s: float = 180.0) -> float:
    deadline = time.monotonic() + timeout_s
    while (VARIANT in listed(client)) != present:
        assert time.monotonic() < deadline, f"{VARIANT} {'not listed' if present else 'still listed'}"
        time.sleep(0.2)
    return time.monotonic()


def not_found(client: TokenlineClient, model: str) -> bool:
    with pytest.raises(grpc.RpcError) as refused:
        list(client.stream(answer_request(model)))
    return refused.value.code() == grpc.StatusCode.NOT_FOUND and model in (refused.value.details() or "")


def test_publishing_serves_the_variant_without_restarting_the_app_and_unpublishing_stops_it(
    live_stack: Stack, tmp_path: Path
) -> None:
    app = live_stack.config.app_name
    before = replicas(app)
    assert {"ingress", "tokenizer", "detokenizer", "engine-demo", "variant-watcher"} <= before.keys()
    with TokenlineClient(live_stack.target, live_stack.api_key) as client:
        assert not_found(client, VARIANT)  # not published yet
        with Traffic(live_stack).running() as traffic:
            publish(live_stack, tmp_path / "variants")
            published_at = time.monotonic()
            served_at = wait_listed(client, present=True)
            time.sleep(1.0)  # a few more streams after the variant came up
        variant = listed(client)[VARIANT]
        assert variant.variant_of == "demo" and variant.recipe == "int8"
        assert variant.gate["perplexity_ratio"] <= 1.01 and variant.gate["top1_agreement"] >= 0.97
        messages = list(client.stream(answer_request(VARIANT)))
        assert "".join(m.text for m in messages) == "47"
        assert messages[-1].finish_reason == pb.FINISH_REASON_STOP
        assert not_found(client, "demo@int4")  # another recipe of the same model: never published

    # Every stream of the source model finished with the right answer, some of them while the
    # variant's engines were being deployed, and none failed.
    assert not traffic.errors, traffic.errors[:3]
    assert traffic.finished and all(f.text == "47" for f in traffic.finished)
    assert all(f.finish_reason == pb.FINISH_REASON_STOP for f in traffic.finished)
    assert any(f.started < served_at and f.ended > published_at for f in traffic.finished)
    # The app's own replicas are the ones that ran before; the variant runs in an app of its own.
    assert replicas(app) == before
    variant_replicas = replicas(variant_app_name(app, VARIANT))
    assert set(variant_replicas) == {f"engine-{VARIANT}"} and len(variant_replicas[f"engine-{VARIANT}"]) == 1

    # Unpublished: new requests get NOT_FOUND and the variant's application goes away.
    with VariantRegistry(live_stack.config.redis_url, live_stack.config.queue.key_prefix) as registry:
        assert registry.remove(VARIANT)
    with TokenlineClient(live_stack.target, live_stack.api_key) as client:
        wait_listed(client, present=False, timeout_s=30.0)
        assert not_found(client, VARIANT)
    deadline = time.monotonic() + 60.0
    while variant_app_name(app, VARIANT) in serve.status().applications:
        assert time.monotonic() < deadline, "the variant's application was not deleted"
        time.sleep(0.5)
    assert replicas(app) == before
