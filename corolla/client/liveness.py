"""Waiting for a server without mistaking load for death: one policy for every call a client waits on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

from corolla.client.hop_session import UnresponsiveServerError

if TYPE_CHECKING:
    from corolla.client.sequence_manager import RemoteSequenceManager

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def await_alive(manager: RemoteSequenceManager, peer: str, coro: Awaitable[T], expected: float) -> T:
    """Await ``coro`` (a call to server ``peer`` expected to take ``expected`` seconds); past each deadline, ping
    the server and give up only if it does not answer.

    The first deadline is ``max(step_timeout_floor, step_timeout_factor x expected)``. A busy server (many
    sessions batched, a long queue) is slow, not dead: its pings are answered off its compute path, so it is
    waited for, with deadlines doubling (up to 8 s) while it keeps answering. A ping lost under load gets a second
    chance with 4x the timeout; only a server silent to both is given up (a stopped process, a cut link), and none
    is waited for past ``request_timeout``."""
    cfg = manager.config
    task = asyncio.ensure_future(coro)
    deadline = max(cfg.step_timeout_floor, cfg.step_timeout_factor * expected)
    waited = 0.0
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=deadline)
            if done:
                return task.result()
            waited += deadline
            if waited >= cfg.request_timeout:
                raise TimeoutError(f"server {peer} took over {waited:.0f} s")
            if await manager.ping(peer) is None and (
                await manager.ping(peer, timeout=4 * cfg.ping_timeout) is None
            ):
                raise UnresponsiveServerError(f"no reply in {waited:.2f} s and no answer to two pings")
            logger.debug("Server %s is slow but alive (%.1f s so far)", peer, waited)
            deadline = min(2 * deadline, max(deadline, 8.0))
    finally:
        if not task.done():
            task.cancel()
