"""The whole serving stack for end-to-end tests: real Redis, real Ray, real gRPC over loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import redis
from ray import serve

from services.config import AppConfig, EngineSettings, ModelConfig
from services.engine.replica import ReplicaStatus
from services.ingress.api_keys import ApiKeyStore
from services.ports import free_loopback_port
from services.queue import QueueConfig, RedisServer
from services.queue.keys import ENGINE_GROUP, QueueKeys
from services.server import running_stack

MODEL_NAME = "demo"


@dataclass(frozen=True)
class Stack:
    config: AppConfig
    target: str
    api_key: str  # tenant "tester", every model
    redis_server: RedisServer  # the stack's private Redis, for faults
    metrics_url: str = ""  # Prometheus endpoint of this node's Ray metrics agent

    def engine_statuses(self, replicas: int, attempts: int = 40) -> dict[int, ReplicaStatus]:
        """The status of every engine replica, by pid. Serve balances handle calls over
        replicas, so call until each has answered."""
        handle = serve.get_deployment_handle(f"engine-{MODEL_NAME}", app_name=self.config.app_name)
        found: dict[int, ReplicaStatus] = {}
        for _ in range(attempts):
            status: ReplicaStatus = handle.status.remote().result(timeout_s=10)
            found[status.pid] = status
            if len(found) >= replicas:
                break
        return found

    def detokenizer_owners(self, replicas: int, attempts: int = 40) -> dict[int, tuple[str, ...]]:
        """Request ids each detokenizer replica renders, by pid (calls until each answered)."""
        handle = serve.get_deployment_handle("detokenizer", app_name=self.config.app_name)
        found: dict[int, tuple[str, ...]] = {}
        for _ in range(attempts):
            pid, owned = handle.owned_requests.remote().result(timeout_s=10)
            found[pid] = owned
            if len(found) >= replicas:
                break
        return found

    def unfinished_in_queue(self) -> tuple[int, int]:
        """(entries pending in the engines' consumer group of any priority, admission slots still taken)."""
        keys = QueueKeys(self.config.queue.key_prefix).for_model(MODEL_NAME)
        with redis.Redis.from_url(self.config.redis_url) as client:
            bands = [band for band in keys.bands if client.exists(band)]
            pending = sum(int(client.xpending(band, ENGINE_GROUP)["pending"]) for band in bands)
            return pending, int(client.hlen(keys.active))


def free_port() -> int:
    return free_loopback_port()


def stack_config(model_path: str, *, engine_replicas: int = 2, max_queue_depth: int = 64) -> AppConfig:
    return AppConfig(
        models=(
            ModelConfig(
                name=MODEL_NAME,
                path=model_path,
                engine_replicas=engine_replicas,
                engine_stall_after_s=3.0,
                # nice 0: the test process drives the load from the same cores. Engines above it
                # starve the clients (and Serve's controller) that overload and autoscaling tests
                # need running; those tests measure admission and scaling, not the engine's
                # priority. test_context_limit's stack runs the default priority and checks it.
                engine=EngineSettings(
                    kv_cache_memory_gib=0.25, max_num_seqs=16, max_num_batched_tokens=256, nice=0
                ),
            ),
        ),
        grpc_port=free_port(),
        detokenizer_replicas=2,
        queue=QueueConfig(lease_s=3.0, max_queue_depth=max_queue_depth),
    )


def start_stack(
    config: AppConfig,
    credentials: grpc.ChannelCredentials | None = None,
    redis_server: RedisServer | None = None,
) -> Iterator[Stack]:
    """The stack of ``config``, up and answering; ``credentials`` when it serves TLS.
    ``redis_server``: the server that ``config.redis_url`` names, which the test started
    itself; without one the stack starts its own."""
    with running_stack(config) as running:
        with ApiKeyStore(running.config.redis_url, config.queue.key_prefix) as keys:
            api_key, _ = keys.create("tester")
        wait_ready(running.grpc_target, api_key, credentials=credentials)
        server = running.redis_server or redis_server
        if server is None:
            raise RuntimeError("the test stack needs a Redis it or the test started")
        yield Stack(running.config, running.grpc_target, api_key, server, running.metrics_url)


def wait_ready(
    target: str, api_key: str, timeout_s: float = 120.0, credentials: grpc.ChannelCredentials | None = None
) -> None:
    from services.proto.tokenline.v1 import generation_pb2 as pb
    from services.proto.tokenline.v1 import generation_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout_s
    secure = credentials is not None
    with grpc.secure_channel(target, credentials) if secure else grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        while True:
            try:
                stub.ListModels(
                    pb.ListModelsRequest(), timeout=5, metadata=(("authorization", f"Bearer {api_key}"),)
                )
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
