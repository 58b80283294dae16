"""Variants a running app serves beyond the models it was built with: one Redis hash.

``{prefix}:served-variants`` maps ``MODEL@RECIPE`` to a JSON :class:`ServedVariant`. The
variant watcher (``services/variant_watcher.py``) writes an entry once the variant's engine
application is running, and removes it before it stops that application. The ingress, the
tokenizer and the detokenizer read the hash through :class:`ServedVariantsCache`, so a
variant published while the app runs becomes servable without redeploying any of them, and
a name that is in no view stays NOT_FOUND.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from services.queue.connection import AsyncRedisOwner, RedisOwner, async_redis, loop_redis
from services.queue.outage import guard, guard_async

# A replica that is asked for a variant it does not know re-reads the hash at once, but at most
# this often: a client sending made-up MODEL@RECIPE names cannot turn each call into a Redis read.
MISS_REFRESH_S = 0.25


class LiveVariantsConfig(BaseModel):
    """Serving variants published while the app runs (``tokenline optimize --publish``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        default=True,
        description="Serve every variant published in this app's registry while it runs: each gets an "
        "engine application of its own, started without redeploying the ingress, tokenizer, "
        "detokenizer or other engines.",
    )
    poll_s: float = Field(default=2.0, gt=0.0, description="How often the watcher reads the registry.")
    cache_ttl_s: float = Field(
        default=2.0,
        ge=0.0,
        description="How long the ingress, tokenizer and detokenizer trust their list of served variants "
        "(a request for a variant not on it re-reads the list at once).",
    )


@dataclass(frozen=True)
class ServedVariant:
    name: str  # MODEL@RECIPE
    app_name: str  # the Serve application that runs its engine replicas
    artifact_dir: str
    checksum: str
    variant_of: str
    recipe: str
    max_model_len: int | None  # the engine's context limit; None: the model's own
    default_max_tokens: int
    gate: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str | bytes) -> ServedVariant:
        data: dict[str, Any] = json.loads(text)
        return ServedVariant(**data)

    def model_info_fields(self) -> dict[str, object]:
        """The ModelInfo fields that describe a variant (as for one served from the start)."""
        return {"variant_of": self.variant_of, "recipe": self.recipe, "gate": dict(self.gate)}


def served_variants_key(key_prefix: str) -> str:
    return f"{key_prefix}:served-variants"


def _parse(raw: dict[Any, Any]) -> dict[str, ServedVariant]:
    entries = (ServedVariant.from_json(value) for value in raw.values())
    return {entry.name: entry for entry in entries}


class ServedVariantsCache:
    """One replica's view of the served variants; pure (the caller reads Redis when told to)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._variants: dict[str, ServedVariant] = {}
        self._read_at: float | None = None

    def needs_read(self, wanted: str | None = None) -> bool:
        """Whether to re-read Redis before answering: the view is older than the TTL, or a
        variant name it lacks is asked for and the last read is not brand new."""
        if self._read_at is None:
            return True
        age = self._clock() - self._read_at
        if age >= self._ttl_s:
            return True
        missing = wanted is not None and "@" in wanted and wanted not in self._variants
        return missing and age >= MISS_REFRESH_S

    def update(self, variants: dict[str, ServedVariant]) -> None:
        self._variants = variants
        self._read_at = self._clock()

    def get(self, name: str) -> ServedVariant | None:
        return self._variants.get(name)

    def all(self) -> dict[str, ServedVariant]:
        return dict(self._variants)


class ServedVariantsStore(RedisOwner):
    """The watcher's side: write and remove entries (synchronous)."""

    def __init__(self, url: str, key_prefix: str) -> None:
        self._redis = redis.Redis.from_url(url, protocol=2)
        self._key = served_variants_key(key_prefix)

    def mark_served(self, variant: ServedVariant) -> None:
        self._redis.hset(self._key, variant.name, variant.to_json())

    def unmark(self, name: str) -> None:
        self._redis.hdel(self._key, name)

    def all(self) -> dict[str, ServedVariant]:
        return _parse(self._redis.hgetall(self._key))


class LiveVariants(AsyncRedisOwner):
    """The ingress's and tokenizer's view: cached, re-read when stale (asyncio)."""

    def __init__(self, url: str, key_prefix: str, ttl_s: float) -> None:
        self._redis = async_redis(url, decode_responses=False)
        self._key = served_variants_key(key_prefix)
        self._cache = ServedVariantsCache(ttl_s)

    @guard_async
    async def get(self, name: str) -> ServedVariant | None:
        if self._cache.needs_read(name):
            self._cache.update(_parse(await self._redis.hgetall(self._key)))
        return self._cache.get(name)

    @guard_async
    async def all(self) -> dict[str, ServedVariant]:
        if self._cache.needs_read():
            self._cache.update(_parse(await self._redis.hgetall(self._key)))
        return self._cache.all()


class LiveVariantsSync(RedisOwner):
    """The detokenizer loop's view: cached, re-read when stale (synchronous, loop-thread client)."""

    def __init__(self, url: str, key_prefix: str, ttl_s: float) -> None:
        self._redis = loop_redis(url)
        self._key = served_variants_key(key_prefix)
        self._cache = ServedVariantsCache(ttl_s)

    @guard
    def get(self, name: str) -> ServedVariant | None:
        if self._cache.needs_read(name):
            self._cache.update(_parse(self._redis.hgetall(self._key)))
        return self._cache.get(name)


@dataclass(frozen=True)
class ServedVariantsSource:
    """Where a replica finds the served variants: what the app passes to its deployments."""

    redis_url: str
    key_prefix: str
    cache_ttl_s: float

    def async_view(self) -> LiveVariants:
        return LiveVariants(self.redis_url, self.key_prefix, self.cache_ttl_s)

    def sync_view(self) -> LiveVariantsSync:
        return LiveVariantsSync(self.redis_url, self.key_prefix, self.cache_ttl_s)
