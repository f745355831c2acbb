"""Per-client bounds: how much of one server a single peer (an authenticated libp2p peer id) may hold.

One counter per resource, each bounded per peer: open calls (streams), inference sessions (open or waiting
for cache), compute jobs waiting or running. A peer at its bound is refused at once with an error that names
the bound and the flag that sets it: nothing queues behind the limit, so a greedy peer costs the others
nothing but the refusals. The KV-cache share is counted by :class:`~corolla.server.memory_cache.MemoryCache`
itself (it counts block-tokens, not items), and uploaded adapters by
:class:`~corolla.server.adapters.AdapterStore` (bytes and count per peer).

Peers are whatever the transport authenticates; one person with many peer ids gets many shares (keeping
strangers out is the private swarm's job, not these bounds'). Work the server does for itself (measurements
at start) has no peer (``None``) and is never counted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable

from corolla.wire.errors import RemoteError


class Holding:
    """One unit a peer holds in a :class:`PeerCounter`; :meth:`release` gives it back (once; later calls do
    nothing). Also a context manager, sync or async."""

    def __init__(self, counter: PeerCounter | None, peer: Hashable):
        self._counter, self._peer = counter, peer

    def release(self) -> None:
        counter, self._counter = self._counter, None
        if counter is not None:
            counter._release(self._peer)

    def __enter__(self) -> Holding:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    async def __aenter__(self) -> Holding:  # so that it can share an ``async with`` with async resources
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()


class PeerCounter:
    """How many of one resource each peer holds, at most ``limit`` each (0 = no bound).

    ``refuse(held, limit)`` builds the error for a peer over its bound. Thread-safe (the compute worker's
    counter is touched from several event loops in tests)."""

    def __init__(self, limit: int, refuse: Callable[[int, int], RemoteError]):
        if limit < 0:
            raise ValueError(f"a per-client limit must be >= 0 (0 = none), got {limit}")
        self.limit, self._refuse = limit, refuse
        self._held: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def held(self, peer: Hashable) -> int:
        return self._held.get(peer, 0)

    def acquire(self, peer: Hashable | None) -> Holding:
        """One more unit for ``peer``, or the refusal if it holds ``limit`` already (``None``: the server's own
        work, never counted)."""
        if peer is None:
            return Holding(None, None)
        with self._lock:
            held = self._held.get(peer, 0)
            if self.limit and held >= self.limit:
                raise self._refuse(held, self.limit)
            self._held[peer] = held + 1
        return Holding(self, peer)

    def _release(self, peer: Hashable) -> None:
        with self._lock:
            held = self._held[peer] - 1
            if held:
                self._held[peer] = held
            else:
                del self._held[peer]  # peers that hold nothing cost nothing
