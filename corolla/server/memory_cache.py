"""The server-wide KV-cache budget: sessions reserve block-tokens before they allocate, or wait.

The budget is counted in block-tokens: ``--attn_cache_tokens`` (Petals' meaning: tokens per hosted
block) times the number of hosted blocks. A session over blocks [a, b) with batch B and max length L
reserves ``B * L * (b - a)``. A reservation that does not fit waits (first come, first served, so a
big request is not starved by a stream of small ones) until others release, up to a timeout, then
fails with :class:`CacheFullError`. Memory therefore never grows past the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from corolla.wire.errors import CacheFullError


class MemoryCache:
    def __init__(self, capacity: int, alloc_timeout: float):
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.alloc_timeout = alloc_timeout
        self.used = 0
        self._changed = asyncio.Condition()
        self._queue: list[object] = []  # waiting reservations, in arrival order

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @contextlib.asynccontextmanager
    async def reserve(self, size: int, timeout: float | None = None) -> AsyncIterator[None]:
        """Hold ``size`` block-tokens for the duration of the ``async with`` block."""
        if size > self.capacity:
            raise CacheFullError(
                f"the session needs {size} block-tokens of KV cache but this server's whole budget is "
                f"{self.capacity}; use a smaller batch or max_length, or another server"
            )
        timeout = self.alloc_timeout if timeout is None else timeout
        await self._acquire(size, timeout)
        try:
            yield
        finally:
            async with self._changed:
                self.used -= size
                self._changed.notify_all()

    async def _acquire(self, size: int, timeout: float) -> None:
        ticket = object()
        async with self._changed:
            self._queue.append(ticket)
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._queue[0] is ticket and self.free >= size), timeout
                )
            except asyncio.TimeoutError:
                raise CacheFullError(
                    f"the KV cache stayed full for {timeout:.1f} s: {size} block-tokens needed, "
                    f"{self.free} of {self.capacity} free"
                ) from None
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()
            self.used += size
