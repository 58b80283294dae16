"""Shared fixtures: real processes only (see DESIGN.md, "Real parts")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.queue.redis_server import RedisServer
from tests.serving_stack import Stack, stack_config, start_stack


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """One Serve instance per process: a module that starts a stack of its own (it sets
    ``OWN_STACK = True``) runs before any test asks for the shared ``stack``, and its stack is
    gone (module scope) before the shared one starts."""
    items.sort(key=lambda item: not getattr(item.module, "OWN_STACK", False))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the whole session (AOF, appendfsync always)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's redis-server, emptied for this test."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The demo checkpoint, built once per machine (then cached) exactly as `tokenline demo-model` does."""
    from services.demo import build_demo_model

    return build_demo_model()


@pytest.fixture(scope="session")
def stack(demo_model_dir: Path) -> Iterator[Stack]:
    """The whole serving stack, shared by the end-to-end tests: two engine replicas of the demo
    model, a small queue bound and a short lease so that faults resolve in seconds."""
    yield from start_stack(stack_config(str(demo_model_dir)))
