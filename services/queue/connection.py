"""Owners of one Redis connection pool: closed on exit, whichever side (sync or async) they are."""

from __future__ import annotations

from types import TracebackType
from typing import TypeVar

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# Open streams share one blocking reader per ingress replica, so connections are only needed
# for concurrent short commands (enqueue, auth, cancel) and that one read. Past this many,
# callers wait up to POOL_WAIT_S for a free one instead of failing.
MAX_ASYNC_CONNECTIONS = 16
POOL_WAIT_S = 5.0

_SyncOwner = TypeVar("_SyncOwner", bound="RedisOwner")
_AsyncOwner = TypeVar("_AsyncOwner", bound="AsyncRedisOwner")


def async_redis(url: str, *, decode_responses: bool) -> aioredis.Redis:
    """An asyncio client (RESP2) whose pool waits for a free connection instead of failing."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_ASYNC_CONNECTIONS,
        timeout=POOL_WAIT_S,
        protocol=2,
        decode_responses=decode_responses,
    )
    return aioredis.Redis(connection_pool=pool)


def loop_redis(url: str) -> redis.Redis:
    """A synchronous client (RESP2, raw bytes) for a loop thread that waits out Redis outages
    itself (engine replicas, detokenizer replicas): few, short retries, because seconds of
    retrying inside one call would look like a stalled loop to the health check."""
    retry = Retry(ExponentialBackoff(cap=0.2, base=0.01), retries=3)
    return redis.Redis.from_url(url, protocol=2, decode_responses=False, retry=retry)


class RedisOwner:
    """Base of the synchronous clients (engine replicas, the key CLI)."""

    _redis: redis.Redis

    def __enter__(self: _SyncOwner) -> _SyncOwner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._redis.close()


class AsyncRedisOwner:
    """Base of the asynchronous clients (ingress, detokenizer)."""

    _redis: aioredis.Redis

    async def __aenter__(self: _AsyncOwner) -> _AsyncOwner:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._redis.aclose()
