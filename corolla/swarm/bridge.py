"""The one bridge between the synchronous client API and the asyncio network code.

All network work of a client runs on one event loop in a daemon thread. Synchronous callers hand it
a coroutine and block on the result. One hop across the bridge per generated token (the whole chain
step is one coroutine) keeps its cost to tens of microseconds.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from corolla.swarm.loop import new_event_loop

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str = "corolla-client-loop"):
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.run called from its own loop; await the coroutine instead")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def shutdown(self) -> None:
        """Cancel whatever still runs on the loop (background refreshes), then stop the thread."""
        if not self.loop.is_running():
            return

        async def cancel_pending() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_pending(), timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
