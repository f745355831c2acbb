"""The client's one failure policy: what a failed call means, who is banned, and when to give up.

Every call site (a span's forward or backward, an inference step, opening or repairing a chain) runs
its attempts through :meth:`FailurePolicy.retry`: the attempt plans its route, calls, and on failure
raises :class:`PeerFailure` naming the server that failed (``async with blame(peer)``). The policy then
classifies the error:

- **fatal** (the caller's to fix: a bad request, a session over its length, a full cache, missing
  blocks, a client adapter over the server's limit, a client over its per-client share of a server's
  sessions or KV cache, ``ClientLimitError``: the client holds those itself, so it is told rather than
  spread over other servers, and the server is not at fault) propagates at once, as its own type, and
  bans no one;
- **recoverable by the caller** (``recover(peer, error)`` returns True: e.g. a server that lost a
  client's LoRA upload gets it again) counts a retry without a ban;
- anything else (EOF from a dead server, a missed deadline and a failed ping, an error answer) bans the
  server (15 s, doubling on repeats up to 300 s) and counts a retry.

After ``max_retries`` failures of one operation it raises :class:`ChainFailedError`. Back-off is the
planner's business: re-planning after a ban picks another server, and when none is left,
``make_route`` waits with exponential back-off, bounded by ``missing_blocks_timeout``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from corolla.client.config import ClientConfig
from corolla.wire.errors import (
    AdapterLimitError,
    BadRequestError,
    CacheFullError,
    ChainFailedError,
    ClientLimitError,
    MissingBlocksError,
    NotAMemberError,
    SessionLengthError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors that are the caller's to fix: never retried on another server.
FATAL_ERRORS = (
    BadRequestError, SessionLengthError, CacheFullError, MissingBlocksError, ChainFailedError, AdapterLimitError,
    NotAMemberError, ClientLimitError,
)  # fmt: skip


class PeerFailure(Exception):
    """An attempt failed at server ``peer`` with ``error`` (raised inside :meth:`FailurePolicy.retry`)."""

    def __init__(self, peer: str, error: BaseException):
        super().__init__(peer, error)
        self.peer, self.error = peer, error


@asynccontextmanager
async def blame(peer: str) -> AsyncIterator[None]:
    """Errors raised inside are ``peer``'s failure (cancellation passes through)."""
    try:
        yield
    except PeerFailure:
        raise
    except Exception as e:
        raise PeerFailure(peer, e) from e


class FailurePolicy:
    """Bans and retry limits, shared by every call of one client."""

    def __init__(self, config: ClientConfig, on_ban: Callable[[str], None] = lambda peer: None):
        self.config = config
        self.on_ban = on_ban
        self._bans: dict[str, tuple[float, int]] = {}  # peer -> (banned until, times banned)

    def is_banned(self, peer: str) -> bool:
        entry = self._bans.get(peer)
        return entry is not None and entry[0] > time.monotonic()

    def ban(self, peer: str, reason: object) -> None:
        _, count = self._bans.get(peer, (0.0, 0))
        duration = min(self.config.ban_timeout * 2**count, self.config.max_ban_timeout)
        self._bans[peer] = (time.monotonic() + duration, count + 1)
        self.on_ban(peer)
        logger.warning("Avoiding server %s for %.0f s: %s", peer, duration, reason or type(reason).__name__)

    def lift_ban(self, peer: str) -> None:
        """Use ``peer`` again now; its count stays, so a repeat offender is banned longer next time."""
        if peer in self._bans:
            self._bans[peer] = (0.0, self._bans[peer][1])

    def note_failure(self, peer: str, error: BaseException, failures: int) -> None:
        """Failure number ``failures`` of one operation: fatal errors propagate, others ban and count."""
        if isinstance(error, FATAL_ERRORS):
            raise error
        self.ban(peer, repr(error))
        self.check_limit(error, failures)

    def check_limit(self, error: BaseException, failures: int) -> None:
        if self.config.max_retries is not None and failures > self.config.max_retries:
            raise ChainFailedError(f"gave up after {failures} failures; last: {error!r}") from error

    async def retry(
        self,
        attempt: Callable[[], Awaitable[T]],
        recover: Callable[[str, BaseException], bool] | None = None,
    ) -> T:
        """Run ``attempt`` until it succeeds; each :class:`PeerFailure` it raises goes through the policy."""
        failures = 0
        while True:
            try:
                return await attempt()
            except PeerFailure as failure:
                failures += 1
                if recover is not None and recover(failure.peer, failure.error):
                    self.check_limit(failure.error, failures)
                else:
                    self.note_failure(failure.peer, failure.error, failures)
