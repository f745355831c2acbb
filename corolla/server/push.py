"""Server-to-server push of inference steps: a server sends its output straight to the next server's session.

Without push, the client relays every hop (client → A → client → B → ...): a token costs one round trip per
hop. With push, the client sends a step to the first server together with the rest of the chain
(``InferenceStep.push``: each later hop's peer, session id and secret token); each server answers its client
as before, and also sends its output to the next server as a :class:`PushedStep`, which that server runs as if
its client had sent it. The client still gets every hop's output (it keeps them as the next hop's inputs for
replay, so failover works as without push), and relays a hop itself when a push is late or lost; a session
runs each ``step_id`` once, so a step that arrives both ways is computed once.

Trust: a pushed step is accepted only for an open session whose ``push_token`` it carries (16 random bytes the
client gave that session at open and the previous server in the step's push list; compared in constant
time). Its tensors and offset are checked against the session before it is queued; a refused push is answered
on the push stream with the error, which then closes, and changes no cache. Queues are bounded.

Here: :class:`SessionDirectory` (open sessions by id, for pushes to find) and :class:`Pusher` (one session's
outgoing pushes: a stream per next server, reused, messages in order, failures logged for the client's relay
to cover).
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from corolla.models.session import KVSession
from corolla.server.checks import check_hypo_ids, check_inputs
from corolla.swarm.transport import Connection, Transport
from corolla.wire.errors import BadRequestError, ServerBusyError, SessionLengthError
from corolla.wire.messages import PUSH_ID_BYTES, PushedStep, PushTarget

logger = logging.getLogger(__name__)

#: pushed steps waiting for one session at most (a step is normally consumed at once)
MAX_PENDING_PUSHES = 4
#: hops a step may still be pushed through (a chain is never longer than the model has blocks)
MAX_PUSH_HOPS = 256


class LiveSession:
    """An open session as pushes see it: its secret, its caches (for checks) and its inbox."""

    def __init__(self, token: bytes, kv: KVSession, hidden_size: int):
        self.token, self.kv, self.hidden_size = token, kv, hidden_size
        self.inbox: asyncio.Queue[PushedStep] = asyncio.Queue(MAX_PENDING_PUSHES)


class SessionDirectory:
    """This server's open sessions that accept pushed steps, by session id."""

    def __init__(self) -> None:
        self._sessions: dict[bytes, LiveSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def register(self, session_id: bytes, token: bytes, kv: KVSession, hidden_size: int) -> LiveSession:
        if len(session_id) != PUSH_ID_BYTES or len(token) != PUSH_ID_BYTES:
            raise BadRequestError(f"session_id and push_token must be {PUSH_ID_BYTES} bytes each (or both empty)")
        if session_id in self._sessions:
            raise BadRequestError("a session with this session_id is already open here")
        live = self._sessions[session_id] = LiveSession(token, kv, hidden_size)
        return live

    def unregister(self, session_id: bytes) -> None:
        self._sessions.pop(session_id, None)

    def deliver(self, step: PushedStep) -> None:
        """Queue a pushed step for its session, or raise the error that refuses it (nothing is changed)."""
        live = self._sessions.get(step.session_id)
        if live is None:
            raise BadRequestError("pushed step for a session that is not open here (closed, or never opened)")
        if not hmac.compare_digest(step.token, live.token):
            raise BadRequestError("pushed step with a wrong push token for this session")
        if len(step.push) > MAX_PUSH_HOPS:
            raise BadRequestError(f"a step may be pushed through at most {MAX_PUSH_HOPS} more hops")
        kv = live.kv
        check_inputs(live.hidden_size, step.hidden, step.positions, step.attention_mask, kv.batch_size)
        check_hypo_ids(step.hypo_ids, kv.batch_size)
        tokens = step.hidden.shape[1]
        if not 0 <= step.offset <= kv.length:
            raise BadRequestError(
                f"pushed step offset {step.offset} is past the session's {kv.length} cached tokens"
            )
        if step.offset + tokens > kv.max_length:
            raise SessionLengthError(
                f"pushed step would fill cache positions up to {step.offset + tokens}, over the session's "
                f"max_length {kv.max_length}"
            )
        try:
            live.inbox.put_nowait(step)
        except asyncio.QueueFull:
            raise ServerBusyError(f"over {MAX_PENDING_PUSHES} pushed steps wait for this session") from None


class Pusher:
    """One session's pushes to the next servers: a stream per target, reused; sends in order, never blocks
    the session (a push that fails is logged, and the client relays that hop itself)."""

    def __init__(self, transport: Transport, max_bytes: int):
        self.transport, self.max_bytes = transport, max_bytes
        self._conns: dict[str, Connection] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    def push(self, target: PushTarget, step: PushedStep, compression: str | None) -> None:
        task = asyncio.ensure_future(self._send(target.peer_id, step, compression))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, peer_id: str, step: PushedStep, compression: str | None) -> None:
        async with self._lock:  # one step after another, on one stream per target
            try:
                conn = self._conns.get(peer_id)
                if conn is None or conn.writer.is_closing():
                    conn = self._conns[peer_id] = await self.transport.connect(peer_id, self.max_bytes)
                await conn.send(step, compression)
            except Exception as e:  # the client relays this hop after its deadline
                logger.info("Push of step %d to %s failed: %r", step.step_id, peer_id, e)
                dropped = self._conns.pop(peer_id, None)
                if dropped is not None:
                    dropped.close()

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
