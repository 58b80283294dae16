"""A real two-node Ray cluster on this machine with the serving stack deployed on it, run as
its own process (`python -m tests.two_node_cluster MODEL_DIR`) because a pytest process
holds at most one Ray driver and the session's stack may already be one.

The head node (2 CPUs) gets the front end (ingress, tokenizer, detokenizer, Serve's
controller and its one gRPC proxy) and one engine replica; a second node (1 CPU, its own
raylet and workers) joins once those run and takes the second engine replica:
``engine_max_replicas_per_node: 1`` leaves it nowhere else to go. Then the process prints
one line, READY_PREFIX + JSON (gRPC target, API key, Redis URL, the second node's raylet pid, ...) and
serves until a line arrives on stdin (or it closes); tests/test_multinode.py drives it from outside.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable

import psutil
import ray
from ray import serve
from ray._private import ray_constants
from ray.cluster_utils import Cluster
from ray.serve.config import gRPCOptions

from services.app import GRPC_SERVICER_FUNCTIONS
from services.config import AppConfig, EngineSettings, ModelConfig
from services.ingress.api_keys import ApiKeyStore
from services.queue import QueueConfig, RedisServer
from services.server import RAY_GRPC_MAX_MESSAGE_ENV, RunningStack, running_stack, serve_environment
from tests.serving_stack import MODEL_NAME, free_port, wait_ready

APP_NAME = "twonode"
FRONT_END = ("ingress", "tokenizer", "detokenizer")
READY_PREFIX = "two-node cluster ready: "
# Generous: on this shared 2-core machine under a load average of 60-80, getting both nodes,
# Serve and every replica up took 210 s.
STARTUP_TIMEOUT_S = 480.0


def two_node_config(model_path: str, redis_url: str) -> AppConfig:
    return AppConfig(
        app_name=APP_NAME,
        redis_url=redis_url,
        models=(
            ModelConfig(
                name=MODEL_NAME,
                path=model_path,
                engine_replicas=2,
                engine_max_replicas_per_node=1,
                engine_stall_after_s=3.0,
                # 8 sequences per replica: 16 streams need both replicas.
                engine=EngineSettings(kv_cache_memory_gib=0.25, max_num_seqs=8, max_num_batched_tokens=256),
            ),
        ),
        grpc_port=free_port(),
        # Both "nodes" share this machine's address: one Serve gRPC proxy on the head serves
        # them (HAProxy would want the same port on each node).
        grpc_ingress="proxy",
        queue=QueueConfig(lease_s=3.0, max_queue_depth=64),
    )


def replica_pids(deployment: str) -> list[int]:
    """PIDs of this app's live replicas of a deployment (Ray titles each replica process)."""
    title = f"ServeReplica:{APP_NAME}:{deployment}"
    return [
        p.pid
        for p in psutil.process_iter(["cmdline", "status"])
        if title in " ".join(p.info["cmdline"] or ()) and p.info["status"] != psutil.STATUS_ZOMBIE
    ]


def wait_for(condition: Callable[[], bool], what: str, stopped: threading.Event) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not condition():
        if stopped.is_set() or time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def main(model_path: str) -> int:
    started = time.monotonic()
    with RedisServer(appendfsync="always") as redis_server:
        return serve_on_two_nodes(two_node_config(model_path, redis_server.url), started)


def serve_on_two_nodes(config: AppConfig, started: float) -> int:
    # What running_stack does for a local Ray: the nodes' processes inherit the proxy's limit
    # and the ingress settings (set over whatever the parent test process left in the environment).
    os.environ[RAY_GRPC_MAX_MESSAGE_ENV] = str(config.grpc_max_message_bytes)
    os.environ.update(serve_environment(config))
    deployed, failed = threading.Event(), threading.Event()
    stacks: list[RunningStack] = []

    def serve_app() -> None:  # serve.run returns once both engine replicas run
        try:
            with running_stack(config) as stack:
                stacks.append(stack)
                deployed.set()
                threading.Event().wait()  # until the process ends with the cluster
        except BaseException:
            failed.set()
            raise

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        # One gRPC proxy, on the head: both nodes share this machine's address and port.
        serve.start(
            proxy_location="HeadOnly",
            grpc_options=gRPCOptions(port=config.grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
            http_options={"host": "127.0.0.1", "port": 0},
        )
        threading.Thread(target=serve_app, name="serve-app", daemon=True).start()
        wait_for(
            lambda: all(replica_pids(d) for d in (*FRONT_END, f"engine-{MODEL_NAME}")),
            "the front end and the first engine replica on the head",
            failed,
        )
        second = cluster.add_node(num_cpus=1)  # here: Ray's node setup needs the main thread
        wait_for(deployed.is_set, "the second engine replica", failed)
        (stack,) = stacks
        with ApiKeyStore(config.redis_url, config.queue.key_prefix) as keys:
            api_key, _ = keys.create("tester")
        wait_ready(stack.grpc_target, api_key)
        raylet = second.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
        ready = {
            "target": stack.grpc_target,
            "api_key": api_key,
            "redis_url": config.redis_url,
            "key_prefix": config.queue.key_prefix,
            "app_name": APP_NAME,
            "second_node_raylet_pid": raylet.pid,
            "nodes": len([n for n in ray.nodes() if n["Alive"]]),
            "startup_s": round(time.monotonic() - started, 1),
        }
        # Ray forwards the workers' stdout here too: the line carries a prefix to be found by.
        print(READY_PREFIX + json.dumps(ready), flush=True)
        sys.stdin.readline()  # serve until told to stop (or stdin closes)
        return 0
    finally:
        # The whole cluster at once: quicker than Serve draining replica by replica, and
        # nothing here needs to survive.
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
