"""The KV-cache budget: reservations fit or wait in arrival order, then fail clearly."""

from __future__ import annotations

import asyncio

import pytest

from corolla.server.memory_cache import MemoryCache
from corolla.wire.errors import CacheFullError


def test_reserve_and_release():
    async def go():
        cache = MemoryCache(100, alloc_timeout=1)
        async with cache.reserve(60):
            assert cache.free == 40
            async with cache.reserve(40):
                assert cache.free == 0
        assert cache.free == 100

    asyncio.run(go())


def test_request_over_budget_waits_then_fails():
    async def go():
        cache = MemoryCache(100, alloc_timeout=0.2)
        async with cache.reserve(80):
            with pytest.raises(CacheFullError, match="stayed full for 0.2 s"):
                async with cache.reserve(30):
                    pass
        assert cache.free == 100

    asyncio.run(go())


def test_request_bigger_than_budget_fails_at_once():
    async def go():
        with pytest.raises(CacheFullError, match="whole budget is 10"):
            async with MemoryCache(10, alloc_timeout=5).reserve(11):
                pass

    asyncio.run(go())


def test_waiter_gets_space_when_released_in_arrival_order():
    async def go():
        cache = MemoryCache(100, alloc_timeout=5)
        order = []
        hold = asyncio.Event()

        async def user(name, size):
            async with cache.reserve(size):
                order.append(name)
                await hold.wait()

        first = asyncio.create_task(user("first", 90))
        await asyncio.sleep(0.01)
        big = asyncio.create_task(user("big", 50))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(user("small", 5))  # fits now, but must not overtake "big"
        await asyncio.sleep(0.05)
        assert order == ["first"]
        hold.set()
        await asyncio.gather(first, big, small)
        assert order == ["first", "big", "small"]
        assert cache.free == 100

    asyncio.run(go())
