"""Starts and stops the whole stack: private Redis (unless given), Ray, Serve with gRPC, the app."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from services.app import GRPC_SERVICER_FUNCTION, build_app
from services.config import AppConfig
from services.queue import RedisServer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunningStack:
    config: AppConfig  # with the Redis URL actually in use
    grpc_target: str  # HOST:PORT for clients


@contextlib.contextmanager
def running_stack(config: AppConfig, ray_address: str | None = None) -> Iterator[RunningStack]:
    """Everything ``tokenline serve`` runs, torn down in reverse order on exit."""
    with contextlib.ExitStack() as stack:
        if not config.redis_url:
            redis_server = stack.enter_context(RedisServer(appendfsync="always"))
            config = config.model_copy(update={"redis_url": redis_server.url})
        if not ray.is_initialized():
            ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING)
            stack.callback(ray.shutdown)
        serve.start(
            grpc_options=gRPCOptions(port=config.grpc_port, grpc_servicer_functions=[GRPC_SERVICER_FUNCTION]),
            http_options={"host": "127.0.0.1", "port": 0},
        )
        stack.callback(serve.shutdown)
        serve.run(build_app(config), name=config.app_name)
        yield RunningStack(config, f"127.0.0.1:{config.grpc_port}")


def run_server(config: AppConfig, ray_address: str | None = None) -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with running_stack(config, ray_address) as stack:
        print(f"ready: grpc://{stack.grpc_target}", flush=True)
        stop.wait()
        logger.info("shutting down")
    return 0
