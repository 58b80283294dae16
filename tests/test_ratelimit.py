"""Per-tenant token buckets against a real redis-server."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import redis

from services.errors import InvalidParameterError
from services.ingress.api_keys import Tenant
from services.ingress.ratelimit import RateLimitedError, RateLimiter, RequestExceedsQuotaError

T = TypeVar("T")


def tenant(name: str, rpm: int = 0, tpm: int = 0) -> Tenant:
    return Tenant(name, "0123456789ab", (), rpm, tpm)


def run_with(url: str, body: Callable[[RateLimiter], Awaitable[T]], window_s: float = 60.0) -> T:
    async def main() -> T:
        async with RateLimiter(url, window_s=window_s) as limiter:
            return await body(limiter)

    return asyncio.run(main())


async def admitted(limiter: RateLimiter, who: Tenant, tokens: int = 1) -> bool:
    try:
        await limiter.admit(who, tokens)
    except RateLimitedError:
        return False
    return True


def test_requests_per_minute_limit_leaves_other_tenants_alone(redis_url: str) -> None:
    limited, other = tenant("acme", rpm=5), tenant("beta", rpm=5)

    async def body(limiter: RateLimiter) -> None:
        for _ in range(5):
            await limiter.admit(limited, 10)
        with pytest.raises(RateLimitedError) as error:
            await limiter.admit(limited, 10)
        assert (error.value.tenant, error.value.limit_kind) == ("acme", "requests_per_minute")
        # one request back takes 60 s / 5 = 12 s
        assert 11.0 < error.value.retry_after_s <= 12.001
        assert [await admitted(limiter, other) for _ in range(5)] == [True] * 5
        assert not await admitted(limiter, limited)

    run_with(redis_url, body)


def test_tokens_per_minute_limit(redis_url: str) -> None:
    who = tenant("acme", tpm=100)

    async def body(limiter: RateLimiter) -> None:
        await limiter.admit(who, 60)
        with pytest.raises(RateLimitedError) as error:
            await limiter.admit(who, 50)
        assert error.value.limit_kind == "tokens_per_minute"
        assert 5.0 < error.value.retry_after_s <= 6.001  # 10 tokens at 100 per 60 s
        await limiter.admit(who, 40)
        assert not await admitted(limiter, who, 1)
        assert await admitted(limiter, tenant("beta", tpm=100), 100)

    run_with(redis_url, body)


def test_a_refused_check_takes_nothing_from_either_bucket(redis_url: str) -> None:
    who = tenant("acme", rpm=5, tpm=100)

    async def body(limiter: RateLimiter) -> None:
        await limiter.admit(who, 90)
        assert not await admitted(limiter, who, 20)  # tokens refuse: the request must not be counted
        for _ in range(4):
            await limiter.admit(who, 1)
        with pytest.raises(RateLimitedError) as error:
            await limiter.admit(who, 1)
        assert error.value.limit_kind == "requests_per_minute"

    run_with(redis_url, body)


def test_buckets_refill_continuously(redis_url: str) -> None:
    who = tenant("acme", rpm=5)

    async def body(limiter: RateLimiter) -> None:
        for _ in range(50):  # drain; on a slow machine some refill may trickle in meanwhile
            try:
                await limiter.admit(who, 1)
            except RateLimitedError as error:
                retry_after_s = error.retry_after_s
                break
        else:
            pytest.fail("never limited")
        assert 0 < retry_after_s <= 0.201  # 1 s window / 5 requests
        await asyncio.sleep(retry_after_s + 0.02)
        await limiter.admit(who, 1)  # one request's worth came back, not the whole bucket
        assert not await admitted(limiter, who)
        await asyncio.sleep(1.05)  # a whole window: full again
        assert [await admitted(limiter, who) for _ in range(5)] == [True] * 5

    run_with(redis_url, body, window_s=1.0)


def test_replicas_share_the_bucket_atomically(redis_url: str) -> None:
    who = tenant("acme", rpm=10)

    async def main() -> list[bool]:
        async with RateLimiter(redis_url) as first, RateLimiter(redis_url) as second:
            calls = [admitted(first if i % 2 else second, who) for i in range(60)]
            return await asyncio.gather(*calls)

    assert sum(asyncio.run(main())) == 10


def test_unlimited_tenant_never_touches_redis(redis_url: str) -> None:
    async def body(limiter: RateLimiter) -> None:
        for _ in range(100):
            await limiter.admit(tenant("free"), 10_000)

    run_with(redis_url, body)
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0


def test_bucket_keys_expire_when_idle(redis_url: str) -> None:
    run_with(redis_url, lambda limiter: limiter.admit(tenant("acme", rpm=5, tpm=50), 5), window_s=2.0)
    with redis.Redis.from_url(redis_url) as client:
        assert client.keys() == [b"tl:ratelimit:acme:buckets"]
        assert 0 < client.pttl("tl:ratelimit:acme:buckets") <= 2000


def test_request_bigger_than_the_whole_token_quota_is_invalid(redis_url: str) -> None:
    async def body(limiter: RateLimiter) -> None:
        with pytest.raises(RequestExceedsQuotaError) as error:
            await limiter.admit(tenant("acme", tpm=100), 101)
        assert isinstance(error.value, InvalidParameterError)
        assert (error.value.field, error.value.value, error.value.limit) == ("max_tokens", 101, 100)
        with pytest.raises(InvalidParameterError) as bad:
            await limiter.admit(tenant("acme", tpm=100), -1)
        assert bad.value.field == "tokens"

    run_with(redis_url, body)


def test_errors_pickle_with_their_fields() -> None:
    limited = pickle.loads(pickle.dumps(RateLimitedError("acme", "tokens_per_minute", 1.5)))
    assert (limited.tenant, limited.limit_kind, limited.retry_after_s) == ("acme", "tokens_per_minute", 1.5)
    too_big = pickle.loads(pickle.dumps(RequestExceedsQuotaError("acme", 101, 100)))
    assert (too_big.tenant, too_big.tokens, too_big.limit, too_big.field) == ("acme", 101, 100, "max_tokens")
