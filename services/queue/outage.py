"""Redis outages as typed errors, and the back-off of those who wait one out.

Every queue operation turns "Redis cannot be reached" into ``QueueUnavailableError``
so that callers decide per role: the ingress answers UNAVAILABLE (the client retries
with the same request id, which is never run twice), readers and engines wait for
Redis to come back. redis-py already retries each command for a few seconds; this
covers the longer outages, such as a restart that replays its append-only file.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, ParamSpec, TypeVar

import redis

from services.errors import QueueUnavailableError

RETRY_AFTER_S = 1.0  # what a refused client is told: about one Redis restart
_FIRST_DELAY_S = 0.05
_MAX_DELAY_S = 1.0

_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextlib.contextmanager
def outage_as_unavailable(operation: str) -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:  # BusyLoadingError included
        raise QueueUnavailableError(operation, type(exc).__name__, RETRY_AFTER_S) from exc


def guard(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """A synchronous queue operation that raises QueueUnavailableError when Redis is away."""

    @functools.wraps(method)
    def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with outage_as_unavailable(method.__name__):
            return method(*args, **kwargs)

    return guarded


def guard_async(method: Callable[_P, Awaitable[_R]]) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """The same for a coroutine method."""

    @functools.wraps(method)
    async def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with outage_as_unavailable(method.__name__):
            return await method(*args, **kwargs)

    return guarded


class Backoff:
    """Exponential delays (50 ms doubling to 1 s) and the time since the first failure."""

    def __init__(self) -> None:
        self._started: float | None = None
        self._delay = _FIRST_DELAY_S

    @property
    def waiting(self) -> bool:
        return self._started is not None

    @property
    def elapsed_s(self) -> float:
        return 0.0 if self._started is None else time.monotonic() - self._started

    def next_delay(self) -> float:
        if self._started is None:
            self._started = time.monotonic()
        delay, self._delay = self._delay, min(self._delay * 2, _MAX_DELAY_S)
        return delay

    def reset(self) -> None:
        self._started = None
        self._delay = _FIRST_DELAY_S
