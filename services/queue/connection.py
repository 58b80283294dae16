"""Owners of one Redis connection pool: closed on exit, whichever side (sync or async) they are."""

from __future__ import annotations

from types import TracebackType
from typing import TypeVar

import redis
import redis.asyncio as aioredis

_SyncOwner = TypeVar("_SyncOwner", bound="RedisOwner")
_AsyncOwner = TypeVar("_AsyncOwner", bound="AsyncRedisOwner")


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
