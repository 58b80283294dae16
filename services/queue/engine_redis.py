"""What both halves of the engine's queue share: one synchronous Redis client, the keys, the
registered scripts, and the checks on the arguments every engine call takes."""

from __future__ import annotations

import redis
from redis.commands.core import Script
from redis.typing import EncodableT

from services.errors import InvalidParameterError
from services.queue.config import QueueConfig
from services.queue.connection import RedisOwner, loop_redis
from services.queue.keys import QueueKeys
from services.queue.scripts import LuaScript

Command = tuple[EncodableT, ...]  # one Redis command as sent: name, then arguments


class EngineRedis(RedisOwner):
    """One engine replica's Redis client. Safe to share between threads: every call takes its
    own connection from redis-py's pool."""

    def __init__(self, url: str, config: QueueConfig | None = None) -> None:
        self._config = config or QueueConfig()
        self._keys = QueueKeys(self._config.key_prefix)
        self._redis = loop_redis(url)  # RESP2, raw bytes: the shapes the codec reads
        self._scripts: dict[LuaScript, Script] = {s: self._redis.register_script(s.value) for s in LuaScript}

    def own_connection(self) -> redis.Connection:
        """A connection of this client's pool for one caller alone, who sends and reads on it
        itself (the step writer); hand it back with ``release_connection``."""
        return self._redis.connection_pool.get_connection()  # type: ignore[return-value]

    def release_connection(self, connection: redis.Connection) -> None:
        self._redis.connection_pool.release(connection)


def check_consumer(consumer: str) -> None:
    if not isinstance(consumer, str) or not consumer:
        raise InvalidParameterError("consumer", consumer, "must be a non-empty string")


def check_non_negative(field: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidParameterError(field, value, "must be an integer >= 0")
