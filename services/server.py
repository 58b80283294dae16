"""Starts and stops the whole stack: private Redis (unless given), Ray, Serve with gRPC, the app."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from services.app import GRPC_SERVICER_FUNCTION, build_app
from services.config import AppConfig, local_api_key_path
from services.ingress.api_keys import ApiKeyStore
from services.queue import RedisServer
from services.queue.registry import add_published_variants

logger = logging.getLogger(__name__)

RAY_GRPC_MAX_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"


@dataclass(frozen=True)
class RunningStack:
    config: AppConfig  # with the Redis URL actually in use
    grpc_target: str  # HOST:PORT for clients
    redis_server: RedisServer | None  # the private Redis this stack started, None when given a URL

    @property
    def private_redis(self) -> bool:
        return self.redis_server is not None


@contextlib.contextmanager
def running_stack(config: AppConfig, ray_address: str | None = None) -> Iterator[RunningStack]:
    """Everything ``tokenline serve`` runs, torn down in reverse order on exit."""
    with contextlib.ExitStack() as stack:
        redis_server = None
        if not config.redis_url:
            redis_server = stack.enter_context(RedisServer(appendfsync="always"))
            config = config.model_copy(update={"redis_url": redis_server.url})
        config = add_published_variants(config)  # MODEL@RECIPE from the registry, checked
        if not ray.is_initialized():
            _set_proxy_message_limit(config.grpc_max_message_bytes)
            ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING)
            stack.callback(ray.shutdown)
        serve.start(
            grpc_options=gRPCOptions(port=config.grpc_port, grpc_servicer_functions=[GRPC_SERVICER_FUNCTION]),
            http_options={"host": "127.0.0.1", "port": 0},
        )
        stack.callback(serve.shutdown)
        serve.run(build_app(config), name=config.app_name)
        yield RunningStack(config, f"127.0.0.1:{config.grpc_port}", redis_server)


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
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with running_stack(config, ray_address) as stack:
        if stack.private_redis and stack.config.auth.enabled:
            _issue_local_key(stack.config)
        print(f"ready: grpc://{stack.grpc_target}", flush=True)
        stop.wait()
        logger.info("shutting down")
    return 0
