"""The event loop every corolla peer runs its network code on.

uvloop when it is installed (hivemind depends on it on Linux and macOS): the per-token path of a hop
is mostly event-loop work (wake-ups, socket reads and writes through the p2pd unix sockets), and
uvloop does it with less overhead than the pure-Python loop. asyncio's own loop otherwise.
"""

from __future__ import annotations

import asyncio

try:
    import uvloop
except ImportError:  # pragma: no cover - e.g. Windows
    uvloop = None


def new_event_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
