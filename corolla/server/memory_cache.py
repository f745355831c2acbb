"""The server-wide KV-cache budget: sessions reserve block-tokens before they allocate, or wait.

The budget is counted in block-tokens: ``--attn_cache_tokens`` (Petals' meaning: tokens per hosted
block) times the number of hosted blocks. A session over blocks [a, b) with batch B and max length L
reserves ``B * L * (b - a)``. A reservation that does not fit waits (first come, first served, so a
big request is not starved by a stream of small ones) until others release, up to a timeout, then
fails with :class:`CacheFullError`. Memory therefore never grows past the budget.

**A share per client.** One peer's reservations (held and waiting) may add up to at most
``max_client_share`` of the budget; a reservation beyond that is refused at once with
:class:`ClientLimitError` (not queued: queued, a greedy peer's requests would sit ahead of everyone else's in
the arrival order). 1.0 turns the share off: one peer may then hold the whole budget and queue for more.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from corolla.wire.errors import CacheFullError, ClientLimitError


class MemoryCache:
    def __init__(self, capacity: int, alloc_timeout: float, max_client_share: float = 1.0):
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        if not 0 < max_client_share <= 1:
            raise ValueError(f"max_client_share must be in (0, 1], got {max_client_share}")
        self.capacity = capacity
        self.alloc_timeout = alloc_timeout
        self.max_client_share = max_client_share
        self.used = 0
        self._clients: dict[str, int] = {}  # peer -> block-tokens it holds or waits for
        self._changed = asyncio.Condition()
        self._queue: list[object] = []  # waiting reservations, in arrival order

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def client_capacity(self) -> int:
        """Block-tokens one client may hold (and wait for) at once."""
        return int(self.capacity * self.max_client_share)

    def client_used(self, client: str) -> int:
        return self._clients.get(client, 0)

    @contextlib.asynccontextmanager
    async def reserve(
        self, size: int, timeout: float | None = None, client: str | None = None
    ) -> AsyncIterator[None]:
        """Hold ``size`` block-tokens for the duration of the ``async with`` block, counted against ``client``'s
        share (``None``: the server's own, not counted)."""
        if size > self.capacity:
            raise CacheFullError(
                f"the session needs {size} block-tokens of KV cache but this server's whole budget is "
                f"{self.capacity}; use a smaller batch or max_length, or another server"
            )
        timeout = self.alloc_timeout if timeout is None else timeout
        self._charge(client, size)
        try:
            await self._acquire(size, timeout)
            try:
                yield
            finally:
                async with self._changed:
                    self.used -= size
                    self._changed.notify_all()
        finally:
            self._refund(client, size)

    def _charge(self, client: str | None, size: int) -> None:
        if client is None:
            return
        held = self._clients.get(client, 0)
        if self.max_client_share < 1 and held + size > self.client_capacity:
            raise ClientLimitError(
                f"this client's sessions would hold {held + size} block-tokens of KV cache here, over its share "
                f"of {self.client_capacity} ({self.max_client_share:g} of {self.capacity}, "
                f"--max_client_cache_share); {held} are held or waited for; close a session or use a smaller "
                "batch or max_length"
            )
        self._clients[client] = held + size

    def _refund(self, client: str | None, size: int) -> None:
        if client is None:
            return
        held = self._clients[client] - size
        if held:
            self._clients[client] = held
        else:
            del self._clients[client]

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
