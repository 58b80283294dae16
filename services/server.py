"""Starts and stops the whole stack: private Redis (unless given), Ray, Serve with gRPC, the app."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.serve.config import ProxyLocation, gRPCOptions

from services.app import GRPC_SERVICER_FUNCTIONS, build_app
from services.config import AppConfig, local_api_key_path
from services.ingress.api_keys import ApiKeyStore
from services.queue import RedisServer
from services.queue.registry import add_published_variants

logger = logging.getLogger(__name__)

RAY_GRPC_MAX_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
HA_PROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
DIRECT_INGRESS_PORTS = 100
# Ray Serve's calls between our deployments (control calls such as the models' info; the
# tokenizer's per-request calls took this path until they moved to Redis): deployment handles
# call replicas over gRPC instead of Ray tasks, the handle's router and the replica's user code
# run on the replica's own event loop rather than on threads of their own. Measured (demo
# model, c=16, sustained 20 s, when the tokenizer calls took it): ingress CPU per token
# 365 -> 272 us, tokenizer replica 101 -> 60 us, throughput +14 %. Serve's log records still go
# out at once (its throughput-optimized mode would also buffer them 1,000 at a time).
SERVE_REQUEST_PATH_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}
# Serve writes each replica's log lines to a file of its own (under the session's logs/serve/)
# and, by default, a second copy to the replica's stderr, which Ray's log monitor tails and
# ships through the GCS to the driver. The copy cost ~20 us of CPU per streamed token at c=16
# (demo model; log monitor 18 -> 7 us, GCS 20 -> 11): the files are the one copy kept.
SERVE_LOG_ENV = {"RAY_SERVE_LOG_TO_STDERR": "0"}
# Ray's log monitor (one per node) reads every worker's stdout/stderr file each 0.1 s turn and,
# while the node has fewer than RAY_LOG_MONITOR_MANY_FILES_THRESHOLD log files, also lists the
# log directory on every turn: at rest 0.0135 of a core (demo model, 20 s). With the threshold at
# 0 it lists the directory every LOG_NAME_UPDATE_INTERVAL_S instead: 0.005. The first console
# lines of a worker started after that (a traceback of a replica that fails at once) then reach
# the console up to 2 s later; files it already reads, and every log file, are as before.
RAY_LOG_MONITOR_ENV = {"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0", "LOG_NAME_UPDATE_INTERVAL_S": "2"}
# Serve's own background work, at rest a third of the stack's idle CPU on two cores (demo model,
# 20 s: 0.226 of a core in all, controller 0.054, GCS 0.026). Its controller reconciles replicas,
# scaling and routes every 0.1 s by default; every 0.5 s: controller 0.022, GCS 0.010, all 0.167.
# A decision (a replacement replica, a scaling step) then waits up to 0.4 s longer; Serve counts
# the autoscaling delays, which are set in seconds, in turns of this loop. Each replica and
# handle also flushes Serve's own request metrics every 100 ms; every 1 s: ~0.0025 of a core
# less per replica (all 0.154 -> 0.144); a scrape every second or more sees no difference, and
# tokenline's own metrics (services/metrics) do not go through that flush.
SERVE_BACKGROUND_ENV = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}


@dataclass(frozen=True)
class RunningStack:
    config: AppConfig  # with the Redis URL actually in use
    grpc_target: str  # HOST:PORT for clients
    redis_server: RedisServer | None  # the private Redis this stack started, None when given a URL
    metrics_url: str  # this node's Prometheus endpoint (Ray's metrics agent)

    @property
    def private_redis(self) -> bool:
        return self.redis_server is not None


@contextlib.contextmanager
def running_stack(config: AppConfig, ray_address: str | None = None) -> Iterator[RunningStack]:
    """Everything ``tokenline serve`` runs, torn down in reverse order on exit."""
    with contextlib.ExitStack() as stack:
        redis_server = None
        config = config.with_environment()  # the Redis password, for the connections made here too
        if not config.redis_url:
            redis_server = stack.enter_context(RedisServer(appendfsync="always"))
            config = config.model_copy(update={"redis_url": redis_server.url})
        config = add_published_variants(config)  # MODEL@RECIPE from the registry, checked
        if not ray.is_initialized():
            _set_proxy_message_limit(config.grpc_max_message_bytes)
            os.environ.update(serve_environment(config))
            # Given no address (flag or RAY_ADDRESS), start the stack's own Ray: ray.init(None)
            # would join any cluster that `ray start` left running on this machine.
            address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
            # A Ray started here serves metrics on the configured port; a cluster keeps its own.
            metrics_port = config.metrics_export_port if address == "local" else None
            with _keeping_stop_signal_handlers():
                ray.init(
                    address=address,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    _metrics_export_port=metrics_port,
                )
            stack.callback(ray.shutdown)
        serve.start(**serve_options(config))
        stack.callback(serve.shutdown)
        serve.run(build_app(config), name=config.app_name)
        yield RunningStack(config, f"127.0.0.1:{config.grpc_port}", redis_server, metrics_url())


def metrics_url() -> str:
    """The Prometheus endpoint of this node's Ray metrics agent: where every tokenline process on
    the node reports (services/metrics). Each node of a cluster has its own."""
    node_id = ray.get_runtime_context().get_node_id()
    nodes = ray.nodes()  # type: ignore[no-untyped-call]  # Ray leaves it untyped
    node = next(n for n in nodes if n["NodeID"] == node_id)
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def replica_logs_dir() -> str:
    """Where Serve writes the log files of this node's replicas (the session's logs/serve/)."""
    node = ray._private.worker._global_node  # Ray has no public call for the session's log directory
    if node is None:
        raise RuntimeError("not connected to Ray")
    return os.path.join(node.get_logs_dir_path(), "serve")


def serve_options(config: AppConfig) -> dict[str, Any]:
    """``serve.start`` arguments: with ``grpc_ingress: replica`` the ingress replicas serve the
    port themselves and Serve runs no proxy at all."""
    if config.grpc_ingress == "replica":
        return {"proxy_location": ProxyLocation.Disabled}
    return {
        "grpc_options": gRPCOptions(port=config.grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
        "http_options": {"host": "127.0.0.1", "port": http_port(config)},
    }


def serve_environment(config: AppConfig) -> dict[str, str]:
    """The Ray Serve settings behind ``grpc_ingress``, plus the request path, logging and
    background ones every mode shares. Serve reads them from the environment of its controller
    and replicas only; a local Ray started here inherits this process's, and on an existing
    cluster they must be set where Ray runs (cluster/ and the Helm chart do)."""
    common = {**SERVE_REQUEST_PATH_ENV, **SERVE_LOG_ENV, **RAY_LOG_MONITOR_ENV, **SERVE_BACKGROUND_ENV}
    if config.grpc_ingress in ("replica", "proxy"):
        return {**common, DIRECT_INGRESS_ENV: "0", HA_PROXY_ENV: "0"}
    first = config.grpc_port + 1 if config.grpc_ingress == "haproxy" else config.grpc_port
    return {
        **common,
        DIRECT_INGRESS_ENV: "1",
        HA_PROXY_ENV: "1" if config.grpc_ingress == "haproxy" else "0",
        # Ingress replicas take ports from here; behind HAProxy clients never see them.
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(first),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(first + DIRECT_INGRESS_PORTS),
        # A freed port may be reused at once: without HAProxy, a replacement replica then comes
        # back on the port its clients dial.
        "RAY_SERVE_PORT_QUARANTINE_S": "0" if config.grpc_ingress == "direct" else "60",
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(config.grpc_max_message_bytes),
        # HAProxy's own listeners, next to the replicas' range rather than on fixed ports, so
        # that two stacks on one machine do not collide.
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(first + DIRECT_INGRESS_PORTS + 1),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(first + DIRECT_INGRESS_PORTS + 2),
    }


def http_port(config: AppConfig) -> int:
    """Serve's HTTP listener (unused by tokenline, but Serve always starts one): any free port
    for its Python proxy, a fixed one behind HAProxy, which cannot bind port 0."""
    if config.grpc_ingress == "proxy":
        return 0
    return config.grpc_port + DIRECT_INGRESS_PORTS + 4


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _keeping_stop_signal_handlers() -> Iterator[None]:
    """Put back the caller's SIGINT/SIGTERM handlers after ``ray.init``, which replaces
    them: its driver's SIGTERM handler exits at once and its core worker's crash handler
    aborts the process, either way without the teardown that stops the private Redis."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (and ray.init then sets none)
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # Re-installing also replaces a handler set below Python (sigaction in C++).
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _set_proxy_message_limit(max_bytes: int) -> None:
    """Ray Serve's gRPC proxy reads its message size limit from its environment only; the
    processes of a local Ray cluster inherit this one, so the config value is placed there
    before ``ray.init`` starts them. On an existing cluster the variable must be set where
    Ray runs (cluster/ and the Helm chart do so)."""
    os.environ[RAY_GRPC_MAX_MESSAGE_ENV] = str(max_bytes)


def _issue_local_key(config: AppConfig) -> None:
    """A private Redis starts empty: give the local user a key for every model."""
    with ApiKeyStore(config.redis_url, config.queue.key_prefix) as store:
        key, record = store.create("local")
    path = local_api_key_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(key + "\n")
    logger.info("api key for tenant 'local' written", extra={"path": str(path), "key_id": record.key_id})
    print(f"api key (tenant 'local', id {record.key_id}) written to {path}", flush=True)


def run_server(config: AppConfig, ray_address: str | None = None) -> int:
    stop = threading.Event()
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda *_: stop.set())
    with running_stack(config, ray_address) as stack:
        if stack.private_redis and stack.config.auth.enabled:
            _issue_local_key(stack.config)
        print(f"ready: grpc://{stack.grpc_target}", flush=True)
        print(f"metrics: {stack.metrics_url}", flush=True)
        print(f"logs: {replica_logs_dir()}", flush=True)
        stop.wait()
        logger.info("shutting down")
    return 0
