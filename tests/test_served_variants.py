"""The served-variants hash and the replicas' cached view of it, against a real Redis."""

from __future__ import annotations

import asyncio
import time

from services.queue.served_variants import (
    MISS_REFRESH_S,
    ServedVariant,
    ServedVariantsCache,
    ServedVariantsSource,
    ServedVariantsStore,
)


def served(name: str = "demo@int8", checksum: str = "c1") -> ServedVariant:
    return ServedVariant(
        name=name,
        app_name=f"tokenline.{name}",
        artifact_dir=f"/variants/{name}",
        checksum=checksum,
        variant_of="demo",
        recipe="int8",
        max_model_len=None,
        default_max_tokens=256,
        gate={"top1_agreement": 0.99},
    )


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cache_rereads_after_its_ttl_and_at_once_for_an_unknown_variant_but_not_too_often() -> None:
    clock = Clock()
    cache = ServedVariantsCache(ttl_s=2.0, clock=clock)
    assert cache.needs_read()  # never read
    cache.update({})
    assert not cache.needs_read("demo")  # a plain name is never a variant: no extra read
    assert not cache.needs_read("demo@int8")  # just read: a made-up name does not force another
    clock.now += MISS_REFRESH_S
    assert cache.needs_read("demo@int8") and not cache.needs_read()
    cache.update({"demo@int8": served()})
    assert not cache.needs_read("demo@int8") and cache.get("demo@int8") == served()
    clock.now += 2.0
    assert cache.needs_read()


def test_a_variant_marked_served_is_seen_by_both_views_and_unmarking_hides_it(redis_url: str) -> None:
    source = ServedVariantsSource(redis_url, "tl", cache_ttl_s=60.0)
    with ServedVariantsStore(redis_url, "tl") as store, source.sync_view() as sync_view:
        assert sync_view.get("demo@int8") is None
        store.mark_served(served())
        time.sleep(MISS_REFRESH_S)
        assert sync_view.get("demo@int8") == served()  # a miss re-read at once, despite the long TTL
        assert store.all() == {"demo@int8": served()}

        async def async_lookups() -> tuple[ServedVariant | None, dict[str, ServedVariant]]:
            async with source.async_view() as async_view:
                return await async_view.get("demo@int8"), await async_view.all()

        assert asyncio.run(async_lookups()) == (served(), {"demo@int8": served()})
        store.unmark("demo@int8")
        with source.sync_view() as fresh_view:
            assert fresh_view.get("demo@int8") is None and store.all() == {}
