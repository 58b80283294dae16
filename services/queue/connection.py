"""Owners of one Redis connection pool: closed on exit, whichever side (sync or async) they are."""

from __future__ import annotations

from types import TracebackType
from typing import TypeVar

import redis
import redis.asyncio as aioredis

# One ingress or detokenizer replica serves up to 1000 streams, and each stream waiting for
# tokens holds a connection for its blocking read: redis-py's default of 100 would turn a
# busy minute into errors. Past this many, callers wait up to POOL_WAIT_S for a free one.
MAX_ASYNC_CONNECTIONS = 1100
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
