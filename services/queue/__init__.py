"""Redis Streams request queue: admission, leases, per-request output streams, cancel, reclaim.

Engines use the synchronous ``EngineQueue``; the ingress and detokenizer use the
asynchronous ``QueueClient``. Both share keys, Lua scripts and codec.
"""

from services.queue.client_queue import EnqueueResult, QueueClient
from services.queue.config import QueueConfig
from services.queue.engine_queue import ClaimedRequest, EngineQueue, KvBudget
from services.queue.output_stream import OutputCursor
from services.queue.redis_server import RedisServer, RedisServerError, RedisTls, find_redis_server

__all__ = [
    "ClaimedRequest",
    "EngineQueue",
    "EnqueueResult",
    "KvBudget",
    "OutputCursor",
    "QueueClient",
    "QueueConfig",
    "RedisServer",
    "RedisServerError",
    "RedisTls",
    "find_redis_server",
]
