"""Per-tenant rate limits: requests per minute and tokens per minute, as token buckets in Redis.

Each tenant has one hash ``tl:ratelimit:{tenant}:buckets`` holding both buckets (level and
last update per bucket). One Lua script refills both from Redis' own clock (``TIME``),
checks both, and takes from both only when both have room, so one check is atomic
across every ingress replica and no ingress clock matters. A bucket holds at most its
per-minute quota and refills continuously at quota/minute; a refused request takes
nothing. The hash expires after one idle window (by then both buckets would be full,
which is what a missing hash means).

Tokens are charged at admission: prompt tokens + max_tokens requested. The quotas are
those of the key the request came with; all keys of a tenant share its buckets.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from redis.commands.core import AsyncScript

from services.errors import InvalidParameterError, TokenlineError
from services.ingress.api_keys import Tenant, check_key_prefix
from services.queue.connection import AsyncRedisOwner, async_redis
from services.queue.outage import guard_async

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 60.0
REQUESTS_PER_MINUTE = "requests_per_minute"
TOKENS_PER_MINUTE = "tokens_per_minute"
_KINDS = (REQUESTS_PER_MINUTE, TOKENS_PER_MINUTE)


class RateLimitedError(TokenlineError):
    """The tenant used up a quota for now (RESOURCE_EXHAUSTED); retry after ``retry_after_s``.

    ``limit_kind``: ``requests_per_minute`` or ``tokens_per_minute``.
    """

    field = "tenant"

    def __init__(self, tenant: str, limit_kind: str, retry_after_s: float) -> None:
        self._init_args = (tenant, limit_kind, retry_after_s)
        self.tenant = tenant
        self.value = tenant
        self.limit_kind = limit_kind
        self.retry_after_s = retry_after_s
        super().__init__(
            f"tenant {tenant!r} is over its {limit_kind} quota; retry after {retry_after_s:.3f}s"
        )


class RequestExceedsQuotaError(InvalidParameterError):
    """One request needs more tokens than the tenant's whole per-minute quota: no retry helps.

    An ``InvalidParameterError`` on ``max_tokens`` (INVALID_ARGUMENT), the lever the client holds.
    """

    def __init__(self, tenant: str, tokens: int, limit: int) -> None:
        super().__init__(
            "max_tokens",
            tokens,
            f"prompt tokens + max_tokens = {tokens} exceeds tenant {tenant!r}'s "
            f"{TOKENS_PER_MINUTE} quota of {limit}",
        )
        self._init_args = (tenant, tokens, limit)
        self.tenant = tenant
        self.tokens = tokens
        self.limit = limit


# KEYS: bucket hash
# ARGV: window_ms, rpm limit, request cost, tpm limit, token cost   (limit 0: not limited)
# Fields: l1/t1 level and update time (ms) of the request bucket, l2/t2 of the token bucket.
# Returns {'ok'} or {'limited', kind index (1|2), wait ms as text}.
_ADMIT = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + tonumber(now_parts[2]) / 1000
local window = tonumber(ARGV[1])
local state = redis.call('HMGET', KEYS[1], 'l1', 't1', 'l2', 't2')
local levels = {}
local worst_kind, worst_wait = 0, 0
for i = 1, 2 do
  local limit = tonumber(ARGV[2 * i])
  local cost = tonumber(ARGV[2 * i + 1])
  if limit > 0 then
    local rate = limit / window
    local level = limit
    local stored, stamp = tonumber(state[2 * i - 1]), tonumber(state[2 * i])
    if stored and stamp then
      level = math.min(limit, stored + math.max(0, now - stamp) * rate)
    end
    levels[i] = level - cost
    if level < cost then
      local wait = (cost - level) / rate
      if wait > worst_wait then
        worst_kind, worst_wait = i, wait
      end
    end
  end
end
if worst_kind > 0 then
  return {'limited', worst_kind, string.format('%.3f', worst_wait)}
end
for i = 1, 2 do
  if levels[i] then
    redis.call('HSET', KEYS[1], 'l' .. i, string.format('%.17g', levels[i]),
               't' .. i, string.format('%.17g', now))
  end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(window))
return {'ok'}
"""


@dataclass(frozen=True)
class RateLimitKeys:
    prefix: str = "tl"

    def bucket(self, tenant: str) -> str:
        return f"{self.prefix}:ratelimit:{tenant}:buckets"


class RateLimiter(AsyncRedisOwner):
    """Admission by tenant quota; one Redis round trip per limited request, none when unlimited.

    ``window_s`` is the quota period (60 s: "per minute"); tests shorten it.
    """

    def __init__(self, redis_url: str, key_prefix: str = "tl", *, window_s: float = DEFAULT_WINDOW_S) -> None:
        if isinstance(window_s, bool) or not isinstance(window_s, (int, float)) or not window_s > 0:
            raise InvalidParameterError("window_s", window_s, "must be a number > 0")
        self._keys = RateLimitKeys(check_key_prefix(key_prefix))
        self._window_ms = max(1.0, float(window_s) * 1000)
        self._redis = async_redis(redis_url, decode_responses=True)
        self._admit: AsyncScript = self._redis.register_script(_ADMIT)

    @guard_async
    async def admit(self, tenant: Tenant, tokens: int) -> None:
        """Charge one request and ``tokens`` (prompt + max_tokens) to the tenant's buckets.

        Raises RateLimitedError (nothing charged) when either bucket lacks room, and
        RequestExceedsQuotaError when ``tokens`` is more than the whole token quota.
        """
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise InvalidParameterError("tokens", tokens, "must be an integer >= 0")
        rpm, tpm = tenant.requests_per_minute, tenant.tokens_per_minute
        if tpm and tokens > tpm:
            logger.info(
                "request exceeds token quota",
                extra={"tenant": tenant.name, "key_id": tenant.key_id, "tokens": tokens, "limit": tpm},
            )
            raise RequestExceedsQuotaError(tenant.name, tokens, tpm)
        if not rpm and not tpm:
            return
        reply = await self._admit(
            keys=[self._keys.bucket(tenant.name)], args=[repr(self._window_ms), rpm, 1, tpm, tokens]
        )
        if reply[0] == "ok":
            return
        kind = _KINDS[int(reply[1]) - 1]
        retry_after_s = max(0.001, math.ceil(float(reply[2])) / 1000)
        logger.info(
            "rate limited",
            extra={
                "tenant": tenant.name,
                "key_id": tenant.key_id,
                "limit_kind": kind,
                "tokens": tokens,
                "retry_after_s": retry_after_s,
            },
        )
        raise RateLimitedError(tenant.name, kind, retry_after_s)
