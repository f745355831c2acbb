"""An inference session through the swarm, with failover that the caller never sees.

The session keeps, for every hop of its chain, the hidden states it sent that hop, plus the position
ids and masks of every step. When a hop fails (EOF from a dead server, an error, or a missed deadline
followed by a failed ping), the server is banned, a new chain is planned for that hop's blocks only,
the hop's input history is replayed through the new servers to rebuild their KV caches, and the
current step goes on from there. Downstream hops are untouched, so with greedy decoding the output is
the same as without the failure.

Failures go through the client's one :class:`~corolla.client.failure_policy.FailurePolicy`: a fatal
error propagates, anything else bans the server and counts a retry of the step (or of the chain's
opening), up to ``max_retries``.

What the session carries besides hidden states: the served ``adapter`` it was opened with, deep
``prompts`` (steps, and replay chunks, that cover cache positions < K are sent as
``InferencePromptStep`` with each hop's blocks' prompts), and the client's own trainables
(:class:`~corolla.client.chain.ChainExtras`: uploaded to each server before its session opens, and named
as the session's adapter).

Verification (:mod:`corolla.client.verification`, ``ClientConfig.verify``): each hop's first step, and later
steps with probability ``verify_fraction``, are checked by a stateless forward of the hop's whole input history
on other servers, started as soon as the hop's input is known and finished before the step returns. A hop
caught returning wrong activations is banned, and the session recomputes from the first position that
differed (the liar's blocks replayed on other servers, the hops after it sent the corrected inputs again).

Deadlines: a step's deadline is ``max(floor, factor x expected step time)``, the expectation coming
from this hop's measured steps (or the server's announced latency before any). A missed deadline
alone does not condemn a server: it is pinged, and only a failed ping bans it; a slow but live server
is waited for, up to ``request_timeout``.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from typing import TYPE_CHECKING

import torch

from corolla.client.chain import NO_EXTRAS, ChainExtras, ChainSession, RouteHop
from corolla.client.failure_policy import blame
from corolla.client.hop_session import HopSession
from corolla.client.liveness import await_alive
from corolla.client.routing import DEFAULT_LATENCY, DEFAULT_RTT, Hop, format_route
from corolla.client.verification import Check, Finding, verifier_for
from corolla.models.deep_prompts import prompt_overlap
from corolla.wire.errors import ChainFailedError, SessionLengthError
from corolla.wire.messages import (
    InferenceOpen,
    InferenceOpened,
    InferencePromptStep,
    InferenceStep,
    InferenceStepResult,
    PushTarget,
)
from corolla.wire.tensors import FLOAT_COMPRESSIONS, INT8_ROWWISE

if TYPE_CHECKING:
    from corolla.client.sequence_manager import RemoteSequenceManager

logger = logging.getLogger(__name__)


class InferenceSession(ChainSession):
    """KV caches for one batch of sequences on a chain of servers. Opened lazily on the first step."""

    def __init__(
        self,
        manager: RemoteSequenceManager,
        max_length: int,
        adapter: str | None = None,
        prompts: torch.Tensor | None = None,
        extras: ChainExtras = NO_EXTRAS,
        blocks: tuple[int, int] | None = None,
    ):
        self.manager, self.max_length = manager, max_length
        self.start, self.end = blocks if blocks is not None else (0, manager.num_blocks)
        if not 0 <= self.start < self.end <= manager.num_blocks:
            raise ValueError(f"blocks [{self.start}, {self.end}) are not within [0, {manager.num_blocks})")
        if prompts is not None and (self.start, self.end) != (0, manager.num_blocks):
            raise ValueError("deep prompts need a session over every block")
        self.extras, self.prompts = extras, prompts  # deep prompts [num_blocks, 1, K, H] or None
        if extras.adapter:  # the client's own adapter: any server (it gets an upload before the session opens)
            self.adapter, self.route_adapter = extras.adapter, None
        else:  # a served adapter, chosen now in the caller's thread (see corolla.client.active_adapter)
            self.adapter = self.route_adapter = manager.served_adapter(adapter)
        self._hops: list[HopSession] = []
        self._positions: list[torch.Tensor] = []
        self._masks: list[torch.Tensor] = []
        self._position = 0
        self._batch_size: int | None = None
        self.closed = False
        self.failovers = 0
        self._step_ids = itertools.count(1)
        #: hops whose input of the current step came pushed by the previous server (relayed if late)
        self.relayed_pushes = 0
        #: checks of the hops' outputs; None when off, or when a stateless forward cannot redo the session's steps
        #: (deep prompts, the client's own LoRA): such sessions are counted unverifiable once
        self._verifier = verifier_for(manager) if manager.config.verify else None
        if self._verifier is not None and (prompts is not None or extras is not NO_EXTRAS):
            self._verifier.stats.unverifiable += 1
            self._verifier = None

    @property
    def position(self) -> int:
        return self._position

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self._hops]

    def describe_route(self) -> list[RouteHop]:
        return self.manager.route_hops(self.route)

    def rewind(self, position: int) -> None:
        """Keep the first ``position`` tokens: each hop's input history (what a failover replays), the
        positions and masks are cut there; the servers' caches are overwritten by the next step."""
        if not 0 <= position <= self._position:
            raise ValueError(f"cannot rewind a session holding {self._position} tokens to {position}")
        if position == self._position:
            return
        self._positions = _cut(self._positions, position)
        self._masks = _cut(self._masks, position)
        for hop in self._hops:
            hop.history = _cut(hop.history, position)
            hop.outputs = _cut(hop.outputs, position) if hop.outputs else []
        self._position = position

    def step(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor,
        hypo_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.closed:
            raise RuntimeError("this inference session is closed")
        if self._position + hidden.shape[1] > self.max_length:
            raise SessionLengthError(
                f"Maximum length exceeded: the session would hold {self._position + hidden.shape[1]} tokens, over "
                f"its max_length {self.max_length}; open the session with a larger max_length"
            )
        if self._batch_size is not None and hidden.shape[0] != self._batch_size:
            raise ValueError(f"this session's batch size is {self._batch_size}, got {hidden.shape[0]}")
        hypo_ids = self._check_hypo_ids(hypo_ids, hidden.shape[0])
        return self.manager.bridge.run(
            self._step(hidden, positions.to(torch.int64), attention_mask.to(torch.bool), hypo_ids)
        )

    def _check_hypo_ids(self, hypo_ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Beam reordering for the next step (None when nothing is cached yet: nothing to reorder)."""
        if hypo_ids is None or self._position == 0:
            return None
        hypo_ids = hypo_ids.cpu().long()
        if tuple(hypo_ids.shape) != (batch,) or int(hypo_ids.min()) < 0 or int(hypo_ids.max()) >= batch:
            raise ValueError(f"hypo_ids must be {batch} row indices in [0, {batch}), got {hypo_ids.tolist()}")
        if self.prompts is not None and self._position < self.prompts.shape[2]:
            raise ValueError("beam reordering inside the deep prompts' prefix is not supported")
        return hypo_ids

    async def _step(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        hypo_ids: torch.Tensor | None = None,
        redo: int = 0,
    ) -> torch.Tensor:
        """One step through every hop. With ``hypo_ids`` each server reorders its cache rows first; the
        client's own record of the inputs (what a failover replays) is reordered only once the step is done,
        so a server that replaces a failed one mid-step is replayed in the old order and reorders like the
        others. Checks of the hops (verification) run beside the chain and are judged before returning."""
        if not self._hops:
            self._batch_size = hidden.shape[0]
            self._hops = await self._open_chain(self.start, self.end, None)
        x, i, step_id, inputs, outputs = hidden, 0, next(self._step_ids), [], []
        push = self._push_allowed(hidden.shape[1])
        checks: list[tuple[HopSession, Check]] = []
        try:
            while i < len(self._hops):
                pushed = push and i > 0 and self._hops[i].accepts_push
                hop = self._hops[i]
                check = self._start_check(hop, x, positions, mask, hypo_ids)
                if check is not None:
                    checks.append((hop, check))
                attempt = functools.partial(
                    self._hop_attempt, i, x, positions, mask, step_id, push, pushed, hypo_ids
                )
                y = await self.manager.policy.retry(attempt, self.extras.recover)
                if self._hops[i] is not hop:  # replaced by failover: the check was of the old server
                    if check is not None:
                        check.reference.cancel()
                        checks.pop()
                    check = self._start_check(self._hops[i], x, positions, mask, hypo_ids)
                    if check is not None:
                        checks.append((self._hops[i], check))
                inputs.append(x)
                outputs.append(y)
                x, i = y, i + 1
            self._commit(inputs, outputs, positions, mask, hypo_ids)
            findings = await self._judge(checks)
        finally:
            for _, check in checks:
                check.reference.cancel()
        if findings:
            return await self._recompute(findings, hidden.shape[1], redo)
        return x.to(hidden.dtype)

    def _commit(self, inputs, outputs, positions, mask, hypo_ids) -> None:
        """Record a step that every hop answered: each hop's input (and output, when verifying), positions, mask."""
        if hypo_ids is not None:
            self._positions = [p[hypo_ids] for p in self._positions]
            self._masks = [m[hypo_ids] for m in self._masks]
        for hop, hop_input, hop_output in zip(self._hops, inputs, outputs, strict=True):
            if hypo_ids is not None:
                hop.history = [h[hypo_ids] for h in hop.history]
                hop.outputs = [o[hypo_ids] for o in hop.outputs]
            hop.history.append(hop_input)
            if self._verifier is not None:
                hop.outputs.append(hop_output)
        self._positions.append(positions)
        self._masks.append(mask)
        self._position += inputs[0].shape[1]

    def _start_check(self, hop: HopSession, x, positions, mask, hypo_ids) -> Check | None:
        """Start checking ``hop`` (its whole input so far and this step's ``x``) if this step of it is due."""
        verifier = self._verifier
        if verifier is None or not verifier.due(hop.checks):
            return None
        hop.checks += 1
        compression = INT8_ROWWISE if self.manager.config.activation_compression == "int8" else None
        return verifier.start(
            hop.hop, _joined(hop.history, x, hypo_ids), _joined(self._positions, positions, hypo_ids),
            _joined(self._masks, mask, hypo_ids), compression, self.route_adapter,
        )  # fmt: skip

    async def _judge(self, checks: list[tuple[HopSession, Check]]) -> list[Finding]:
        """Each checked hop's outputs (this step's included) against its reference; the hops caught lying."""
        if not checks:
            return []
        verdicts = await asyncio.gather(
            *(self._verifier.judge(c, torch.cat(h.outputs, dim=1), self.route_adapter) for h, c in checks)
        )
        return [f for f in verdicts if f is not None]

    async def _recompute(self, findings: list[Finding], tokens: int, redo: int) -> torch.Tensor:
        """After hops were caught lying (and banned): recompute from the first position that differed, the liars'
        blocks on other servers (replayed up to there), every hop after them from there on (servers overwrite
        their caches); returns this step's ``tokens`` outputs."""
        if redo >= (self.manager.config.max_retries or 16):
            raise ChainFailedError(f"gave up after {redo} recomputations over servers returning wrong activations")
        start = min(f.first_position for f in findings)
        liars = {f.peer for f in findings}
        for hop in self._hops:
            if hop.hop.peer_id in liars:
                hop.broken = True
                hop.close()
        hidden = torch.cat(self._hops[0].history, dim=1)[:, start:]
        positions = torch.cat(self._positions, dim=1)[:, start:]
        mask = torch.cat(self._masks, dim=1)[:, start:]
        self._verifier.stats.recomputed_tokens += hidden.shape[1]
        logger.info("Recomputing the session from position %d without %s", start, ", ".join(sorted(liars)))
        self.rewind(start)
        return (await self._step(hidden, positions, mask, None, redo + 1))[:, -tokens:]

    def _push_allowed(self, tokens: int) -> bool:
        """Whether this step goes server to server: push on, several hops, no deep prompts in this step."""
        if not self.manager.config.push or len(self._hops) < 2:
            return False
        return self.prompts is None or prompt_overlap(self.prompts.shape[2], self._position, tokens) == 0

    async def _hop_attempt(
        self, i: int, x, positions, mask, step_id: int, push: bool, pushed: bool, hypo_ids=None
    ):
        """Hop ``i``'s part of this step; a hop that failed before is first replaced (its span re-planned
        and its input history replayed to the new servers), downstream hops are untouched. With ``push``
        the hop is told to push its output on; ``pushed``: its input should already be on its way from the
        previous server (the first attempt then sends nothing unless the push is late)."""
        hop = self._hops[i]
        if hop.broken:
            self._hops[i : i + 1] = await self._open_chain(hop.hop.start, hop.hop.end, hop.history)
            self.failovers += 1
            hop, pushed = self._hops[i], False
        targets = []  # the rest of the chain, up to a hop that pushes do not reach
        for h in self._hops[i + 1 :] if push else ():
            if not h.accepts_push:
                break
            targets.append(PushTarget(h.hop.peer_id, h.session_id, h.push_token))
        message = self._step_message(
            hop.hop, self._position, x, positions, mask, step_id, tuple(targets), hypo_ids
        )
        async with blame(hop.hop.peer_id):
            try:
                return await self._hop_step(hop, message, pushed)
            except BaseException:
                hop.broken = True
                hop.close()
                raise

    async def _hop_step(self, hop: HopSession, message, pushed: bool) -> torch.Tensor:
        """Send ``message`` (unless its input was ``pushed``) and wait for the hop's output; a pushed input
        that is late by a deadline is relayed (the server runs a step id once, whichever copy comes first)."""
        tokens = message.hidden.shape[1]
        t0 = time.perf_counter()
        if not pushed:
            await self._send_step(hop, message)
        await self._confirm_open(hop)
        result = asyncio.ensure_future(self._recv_result(hop, message.step_id))
        try:
            if pushed:
                cfg = self.manager.config
                deadline = max(cfg.step_timeout_floor, cfg.step_timeout_factor * hop.expected(tokens))
                done, _ = await asyncio.wait({result}, timeout=deadline)
                if not done:  # relay it, and from now on relay every step to this hop
                    logger.info(
                        "A push to %s was late by %.2f s: relaying to it from now on", hop.hop.peer_id, deadline
                    )
                    self.relayed_pushes += 1
                    hop.accepts_push = False
                    t0 = time.perf_counter()
                    await self._send_step(hop, message)
            output = await await_alive(self.manager, hop.hop.peer_id, result, hop.expected(tokens))
        finally:
            if not result.done():
                result.cancel()
        hop.observe(tokens, time.perf_counter() - t0)
        return output.hidden

    async def _send_step(self, hop: HopSession, message) -> None:
        try:
            await hop.conn.send(message, hop.compression)
        except (ConnectionError, OSError):
            await self._confirm_open(hop)  # a server that refused the open closes the stream: say why
            raise

    @staticmethod
    async def _recv_result(hop: HopSession, step_id: int) -> InferenceStepResult:
        """The result of step ``step_id`` (results of steps the client no longer waits for are skipped)."""
        while True:
            result = await hop.conn.recv(InferenceStepResult)
            if result.step_id == step_id:
                return result
            logger.debug("Skipped a stale result (step %d, waiting for %d)", result.step_id, step_id)

    def _step_message(self, hop: Hop, offset: int, x, positions, mask, step_id: int = 0, push=(), hypo_ids=None):
        """The message of one step of ``hop`` at cache ``offset``: with the hop's deep prompts if it covers any
        (never pushed), else an ``InferenceStep`` that the server pushes on to ``push``."""
        if self.prompts is None or prompt_overlap(self.prompts.shape[2], offset, x.shape[1]) == 0:
            return InferenceStep(offset, x, positions, mask, step_id, push, hypo_ids)
        prompts = self.prompts[hop.start : hop.end].to(x.dtype).contiguous()
        return InferencePromptStep(offset, x, positions, mask, prompts, step_id)

    async def _open_chain(self, start: int, end: int, history: list[torch.Tensor] | None) -> list[HopSession]:
        """Open sessions covering [start, end) and replay ``history`` (that span's inputs) into them."""
        opened = await self.manager.policy.retry(
            functools.partial(self._open_chain_attempt, start, end, history), self.extras.recover
        )
        verb = "Replaced" if history is not None else "Opened"
        logger.info(
            "%s the chain for blocks [%d, %d): %s", verb, start, end, format_route([h.hop for h in opened])
        )
        return opened

    async def _open_chain_attempt(self, start: int, end: int, history: list[torch.Tensor] | None):
        """Open every hop of a new route at once (the opens travel concurrently and the first step follows
        each open without waiting for its answer), then replay ``history`` hop by hop if there is one."""
        # skip servers that announce too little free cache for this session (relaxed if nobody has room)
        need = (self._batch_size or 1) * self.max_length
        route = await self.manager.make_route(start, end, min_free_cache=need, adapter=self.route_adapter)
        results = await asyncio.gather(*(self._open_hop(hop) for hop in route), return_exceptions=True)
        opened = [r for r in results if isinstance(r, HopSession)]
        try:
            for hop, result in zip(route, results):
                if isinstance(result, BaseException):
                    async with blame(hop.peer_id):
                        raise result
            x = torch.cat(history, dim=1) if history else None
            for session in opened if x is not None else ():
                async with blame(session.hop.peer_id):
                    await self._confirm_open(session)
                    y = await self._replay(session, x)
                    session.history = [x]
                    if self._verifier is not None:
                        session.outputs = [y]
                    x = y
        except BaseException:
            for session in opened:
                session.close()
            raise
        return opened

    async def _open_hop(self, hop: Hop) -> HopSession:
        """Connect and send ``InferenceOpen``; the answer is awaited later (:meth:`_confirm_open`)."""
        manager = self.manager
        await self.extras.before_call(manager, hop.peer_id, hop.start, hop.end)
        conn = await manager.transport.connect(hop.peer_id, manager.config.max_message_bytes)
        info = manager.spans[hop.peer_id].info if hop.peer_id in manager.spans else None
        latency = info.inference_latency if info and info.inference_latency > 0 else DEFAULT_LATENCY
        expected = latency * (hop.end - hop.start)
        rtt = manager.rtts.get(hop.peer_id, DEFAULT_RTT)
        # int8 if the client asked for it; else, until the server answers, the dtype it announces (it computes
        # in it: no precision is lost)
        announced = info.torch_dtype if info is not None else None
        compression = INT8_ROWWISE if manager.config.activation_compression == "int8" else ""
        initial = compression or (announced if announced in FLOAT_COMPRESSIONS else None)
        session = HopSession(hop, conn, initial, expected, rtt)
        try:
            push = (session.session_id, session.push_token) if manager.config.push else (b"", b"")
            await conn.send(
                InferenceOpen(
                    manager.model,
                    hop.start,
                    hop.end,
                    self.max_length,
                    self._batch_size,
                    self.adapter or "",
                    *push,
                    compression,
                )
            )
        except BaseException:
            conn.close()
            raise
        session.opened = asyncio.ensure_future(
            await_alive(self.manager, hop.peer_id, conn.recv(InferenceOpened), expected + rtt)
        )
        return session

    async def _confirm_open(self, session: HopSession) -> None:
        """Wait for the hop's ``InferenceOpened`` (once) and send in the dtype the server computes in."""
        if session.opened is None:
            return
        opened, session.opened = await session.opened, None
        if session.compression != INT8_ROWWISE:
            session.compression = opened.dtype if opened.dtype in FLOAT_COMPRESSIONS else None

    async def _replay(self, session: HopSession, x: torch.Tensor) -> torch.Tensor:
        """Send the whole history to a fresh server, in chunks that fit a message; returns its outputs."""
        positions, mask = torch.cat(self._positions, dim=1), torch.cat(self._masks, dim=1)
        per_token = x.shape[0] * x.shape[2] * x.element_size()
        chunk = max(1, self.manager.config.max_message_bytes // 2 // per_token)
        outputs = []
        for begin in range(0, x.shape[1], chunk):
            sl = slice(begin, begin + chunk)
            await session.conn.send(
                self._step_message(session.hop, begin, x[:, sl], positions[:, sl], mask[:, sl]),
                session.compression,
            )
            expected = session.expected(x[:, sl].shape[1])
            result = await await_alive(
                self.manager, session.hop.peer_id, session.conn.recv(InferenceStepResult), expected
            )
            outputs.append(result.hidden.to(x.dtype))
        return torch.cat(outputs, dim=1)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for hop in self._hops:
            self.manager.bridge.loop.call_soon_threadsafe(hop.close)
        self._hops = []


def _joined(steps: list[torch.Tensor], last: torch.Tensor, hypo_ids: torch.Tensor | None) -> torch.Tensor:
    """Earlier steps (reordered by ``hypo_ids``, as the servers' caches are) and this step's, along dim 1."""
    if hypo_ids is not None:
        steps = [s[hypo_ids] for s in steps]
    return torch.cat([*steps, last], dim=1)


def _cut(steps: list[torch.Tensor], length: int) -> list[torch.Tensor]:
    """The first ``length`` tokens (dim 1) of a list of per-step tensors, as one tensor (or none)."""
    if length == 0:
        return []
    return [torch.cat(steps, dim=1)[:, :length]]
