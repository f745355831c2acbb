"""One hop of an inference session: a server's open stream, its session id and push token, its expected
speed, and the input history a failover replays (see :mod:`corolla.client.inference_session`)."""

from __future__ import annotations

import asyncio
import os

import torch

from corolla.client.routing import Hop
from corolla.swarm.transport import Connection
from corolla.wire.messages import PUSH_ID_BYTES


class UnresponsiveServerError(TimeoutError):
    """A server missed its deadline and did not answer a ping."""


class HopSession:
    """One server's part of the chain: an open stream, its expected speed, and its input history."""

    def __init__(
        self, hop: Hop, conn: Connection, compression: str | None, expected_token_time: float, rtt: float
    ):
        self.hop, self.conn, self.compression = hop, conn, compression
        #: names this hop's server session for pushed steps, and the secret they must carry
        self.session_id, self.push_token = os.urandom(PUSH_ID_BYTES), os.urandom(PUSH_ID_BYTES)
        #: the server's InferenceOpened, awaited before the first step's result (the open rides with it)
        self.opened: asyncio.Future | None = None
        self.history: list[torch.Tensor] = []
        #: the hop's outputs, step by step, kept while the session verifies (see corolla.client.verification)
        self.outputs: list[torch.Tensor] = []
        self.checks = 0  # checks of this hop started so far (its first step is always checked)
        self.broken = False  # failed: replace it (replaying its history) before its next step
        self.accepts_push = True  # False after a push into it was late or lost: the client relays to it
        self.token_time = expected_token_time  # EMA of seconds per token in multi-token steps
        self.step_time = expected_token_time + rtt  # EMA of seconds per one-token step

    def expected(self, tokens: int) -> float:
        return max(self.step_time, self.token_time * tokens)

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens == 1:
            self.step_time = 0.7 * self.step_time + 0.3 * seconds
        else:
            self.token_time = 0.7 * self.token_time + 0.3 * seconds / tokens

    def close(self) -> None:
        if self.opened is not None and not self.opened.done():
            self.opened.cancel()
        self.conn.close()
