"""The one compute worker: a thread that runs every block computation of this server, by priority, and
batches the inference steps of concurrent sessions.

All torch work happens on this thread, so concurrent sessions never race on a device and the event loop
stays free to answer pings and read the next messages while a step computes (torch releases the GIL
inside its kernels). Each job runs in a copy of the submitter's context (``contextvars``), so per-request
choices set around ``submit`` (the LoRA adapter, see ``corolla.models.lora.use_adapter``) apply to that
job only; its result or exception comes back to the submitting coroutine through its future.

**Continuous batching.** At batch 1 a decode step is bound by reading the weights, so running the waiting
steps of many sessions as one forward costs little more than one of them. Inference steps submitted with
:meth:`ComputeWorker.submit_step` wait in a queue; each time the worker is free it takes the first one (by
turn, see below: with one client, the oldest) and every other waiting step of the same group (same stack, same blocks, same adapter) and runs them
as one forward (``corolla.models.session.step_sessions``: projections and MLPs over all rows at once,
attention per session). A batch holds at most ``max_batch_tokens`` tokens (rows x tokens): short steps go
first, and a long prefill takes what is left, in chunks, over several batches, so a long prompt never
stalls everyone's next token. Sessions join or leave between any two batches. When sessions that stepped
lately (and are still open) are not waiting, their steps are on their way (at another server of their
chain, or their client): the first waiting step is held back up to half a forward's time (at most
``max_gather_wait``) for them to join, since on busy cores a larger batch costs far less per token. A step that fails inside a
batch is re-run alone, so only its own session sees the error. With batching off, steps run one at a
time, whole, by turn (the behaviour before batching, whose arrival order one client still gets).

Priorities: inference (steps, and other inference jobs such as deep-prompt steps) before forward and
backward passes (lower number = sooner). Within a priority, **fair queueing across clients**: each job is
tagged with its client's turn (start-time fair queueing at one unit per job: a client's jobs get
consecutive turns counted from the current one), and the worker takes the lowest turn, then arrival order.
Clients with waiting work thus take turns job by job, and one client's flood delays another's job by about
one job per busy client, not by the whole flood; with one client the order is arrival order, as before.
The client is the peer whose call submits the job (:data:`current_client`, set by the request handler);
batching is unchanged (a batch is still the first step's group, short steps first), only which step comes
first and, among equally long steps, who goes first follow the turns. Each client may have at most
``max_client_jobs`` jobs waiting or running; one more is refused at once with ``ServerBusyError``.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import heapq
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from corolla.models.lora import active_adapter
from corolla.models.session import KVSession, SessionStep, step_sessions
from corolla.server.client_limits import PeerCounter
from corolla.wire.errors import ServerBusyError

logger = logging.getLogger(__name__)

PRIORITY_INFERENCE = 0
PRIORITY_FORWARD = 10
#: default token budget of one batch (rows x tokens): bounds how long a batch keeps the others waiting
DEFAULT_MAX_BATCH_TOKENS = 256
#: longest a waiting step is held back for other sessions' steps to join its batch (see _gather_wait)
MAX_GATHER_WAIT = 0.1
#: default bound on one client's jobs waiting or running (see ComputeWorker)
DEFAULT_MAX_CLIENT_JOBS = 64

#: The peer whose call submits compute jobs, for fair queueing and its job bound; set by the request handler
#: for each call. None: the server's own work (measurements), neither counted nor bounded.
current_client: contextvars.ContextVar[str | None] = contextvars.ContextVar("corolla_client", default=None)


class _Turns:
    """Start-time fair queueing with one unit per job, for one priority: each client's jobs get consecutive
    turns starting at the current turn (``now``, the turn of the last job taken), so that taking jobs by
    lowest turn serves the clients with waiting work round-robin, and a client that starts waiting goes next
    round, not after everyone's backlog."""

    def __init__(self) -> None:
        self.now = 0
        self._next: dict[str | None, int] = {}  # client -> its next turn (only clients ahead of ``now``)

    def turn(self, client: str | None) -> int:
        turn = max(self.now, self._next.get(client, 0))
        self._next[client] = turn + 1
        return turn

    def taken(self, turn: int) -> None:
        if turn > self.now:
            self.now = turn
            self._next = {c: t for c, t in self._next.items() if t > turn}  # the others start from now anyway


@dataclass(eq=False)
class _StepJob:
    """A session's step waiting for (or part-way through) the batches that compute it."""

    seq: int
    turn: int
    queued_at: float
    context: contextvars.Context
    group: Hashable
    session: KVSession
    offset: int
    hidden: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def tokens(self) -> int:  # still to compute
        return self.hidden.shape[1]

    @property
    def order(self) -> tuple[int, int]:
        return self.turn, self.seq


@dataclass
class BatchStats:
    """What the worker has batched since the last :meth:`ComputeWorker.take_stats` (for announcements)."""

    batches: int = 0
    steps: int = 0

    @property
    def mean_sessions(self) -> float:
        return self.steps / self.batches if self.batches else 0.0


class ComputeWorker:
    def __init__(
        self,
        name: str = "corolla-compute",
        batching: bool = True,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_gather_wait: float = MAX_GATHER_WAIT,
        max_client_jobs: int = DEFAULT_MAX_CLIENT_JOBS,
    ):
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.batching, self.max_batch_tokens, self.max_gather_wait = batching, max_batch_tokens, max_gather_wait
        self._cond = threading.Condition()
        self._jobs: list[tuple] = []  # heap of (priority, turn, seq, fn, args, loop, future)
        self._steps: list[_StepJob] = []  # in arrival order; taken by turn (see _first_step)
        self._seq = itertools.count()
        self._turns: dict[int, _Turns] = collections.defaultdict(_Turns)  # priority -> its clients' turns
        self._client_jobs = PeerCounter(
            max_client_jobs,
            lambda held, limit: ServerBusyError(
                f"this client has {held} compute jobs waiting or running here, the most one client may have "
                f"(--max_client_jobs {limit}); wait for them to finish"
            ),
        )
        self._stopping = False
        self._stats = BatchStats()
        #: (group, session id) -> (the session, while open; when it last submitted a step);
        #: group -> seconds its forwards take (moving average)
        self._recent: dict[tuple, tuple[weakref.ref, float]] = {}
        self._forward_time: dict[Hashable, float] = {}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def queued_steps(self) -> int:
        return len(self._steps)

    def take_stats(self) -> BatchStats:
        """The batching statistics since the last call (and start counting anew)."""
        with self._cond:
            stats, self._stats = self._stats, BatchStats()
        return stats

    def client_jobs(self, client: str) -> int:
        """The client's jobs waiting or running now."""
        return self._client_jobs.held(client)

    async def submit(self, priority: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the compute thread, alone."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        context = contextvars.copy_context()
        client = context.run(current_client.get)
        with self._client_jobs.acquire(client):  # refused at once when the client has its most
            with self._cond:
                turn = self._turns[priority].turn(client)
                heapq.heappush(
                    self._jobs, (priority, turn, next(self._seq), context.run, (fn, *args), loop, future)
                )
                self._cond.notify()
            try:
                return await future
            except asyncio.CancelledError:
                with self._cond:  # a job nobody waits for leaves at once, with its arguments (a client's tensors)
                    self._jobs = [job for job in self._jobs if job[-1] is not future]
                    heapq.heapify(self._jobs)
                raise

    async def submit_step(
        self, session: KVSession, offset: int, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """One inference step of ``session`` (checked by the caller), batched with other sessions' steps;
        returns its output [B, T, H] on the CPU. Cancelling it drops the step from the queue at once."""
        context = contextvars.copy_context()
        client = context.run(current_client.get)
        with self._client_jobs.acquire(client):  # refused at once when the client has its most
            return await self._queue_step(context, client, session, offset, hidden, positions, mask)

    async def _queue_step(self, context, client, session, offset, hidden, positions, mask) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        group = (id(session.stack), session.start, session.end, id(context.run(active_adapter)))
        now = time.monotonic()
        job = _StepJob(
            next(self._seq),
            0,  # its turn, given under the lock
            now,
            context,
            group,
            session,
            offset,
            hidden,
            positions,
            mask,
            loop,
            loop.create_future(),
        )
        with self._cond:
            job.turn = self._turns[PRIORITY_INFERENCE].turn(client)
            self._steps.append(job)
            self._recent[group, id(session)] = (weakref.ref(session), now)
            self._cond.notify()
        try:
            return await job.future
        except asyncio.CancelledError:
            with self._cond:
                if job in self._steps:
                    self._steps.remove(job)  # its session's cache is not held by the queue any longer
            raise

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # -- on the compute thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._jobs or self._steps):
                    self._cond.wait()
                if self._stopping:
                    return
                batch = job = None
                first = self._first_step()
                if first is not None and (
                    not self._jobs or self._jobs[0][:3] > (PRIORITY_INFERENCE, *first.order)
                ):
                    wait = self._gather_wait()
                    if wait > 0:
                        self._cond.wait(wait)
                        continue
                    batch = self._take_batch()
                elif self._jobs:
                    job = heapq.heappop(self._jobs)
                    self._turns[job[0]].taken(job[1])
            if batch:
                self._run_batch(batch)
            elif job is not None:
                self._run_job(job)
            batch = job = None  # an idle worker holds no session's caches (a closed session is freed at once)

    def _run_job(self, job: tuple) -> None:
        _, _, _, fn, args, loop, future = job
        if future.cancelled():
            return
        try:
            with torch.inference_mode():
                result = fn(*args)
        except BaseException as e:  # delivered to the caller, who decides
            _deliver(loop, future, exception=e)
        else:
            _deliver(loop, future, result=result)

    def _gather_wait(self) -> float:
        """Seconds to wait for more steps before the next batch (called with the lock held).

        Sessions that stepped recently but are not waiting now are on their way (at another server of
        their chain, or at their client): when they are, waiting up to half a forward's time for them makes
        the batch larger, and on a machine whose cores are all busy a larger batch costs far less per token.
        Never more than that, never for sessions idle for a while (a chat user reading), never with
        batching off."""
        first = self._first_step()
        if not self.batching or first is None:
            return 0.0
        now = time.monotonic()
        forward = self._forward_time.get(first.group, 0.0)
        horizon = max(1.0, 4 * forward)
        for key, (ref, seen) in list(self._recent.items()):
            session = ref()
            if now - seen > horizon or session is None or session.closed:  # idle for a while, or closed
                del self._recent[key]
        waiting = sum(1 for job in self._steps if job.group == first.group)
        active = sum(1 for group, _ in self._recent if group == first.group)
        if waiting >= active:
            return 0.0
        return max(0.0, first.queued_at + min(self.max_gather_wait, 0.5 * forward) - now)

    def _first_step(self) -> _StepJob | None:
        """The waiting step whose turn comes first (earliest arrival among equal turns), dropping steps
        cancelled while they waited (called with the lock held)."""
        if any(job.future.done() for job in self._steps):
            self._steps = [job for job in self._steps if not job.future.done()]
        return min(self._steps, key=lambda job: job.order, default=None)

    def _take_batch(self) -> list[tuple[_StepJob, int]]:
        """(job, tokens to compute now) for the next batch; jobs computed whole leave the queue (called with
        the lock held)."""
        first = self._first_step()
        if first is None:
            return []
        if not self.batching:
            self._steps.remove(first)
            self._turns[PRIORITY_INFERENCE].taken(first.turn)
            return [(first, first.tokens)]
        group = first.group
        members = sorted(
            (job for job in self._steps if job.group == group), key=lambda j: (j.tokens, j.order)
        )  # short steps first (among equals: by turn, then arrival); a long prefill takes what is left
        budget, batch = self.max_batch_tokens, []
        for job in members:
            tokens = min(job.tokens, budget // job.rows)
            if tokens == 0 and not batch:
                tokens = 1  # a session wider than the budget still advances, a token at a time
            if tokens == 0:
                break
            batch.append((job, tokens))
            budget -= tokens * job.rows
        for job, tokens in batch:
            if tokens == job.tokens:
                self._steps.remove(job)
        self._turns[PRIORITY_INFERENCE].taken(max(job.turn for job, _ in batch))
        self._stats.batches += 1
        self._stats.steps += len(batch)
        return batch

    def _run_batch(self, batch: list[tuple[_StepJob, int]]) -> None:
        steps = [
            SessionStep(job.session, job.offset, job.hidden[:, :n], job.positions[:, :n], job.mask[:, :n])
            for job, n in batch
        ]
        t0 = time.monotonic()
        try:
            with torch.inference_mode():
                outs = batch[0][0].context.run(step_sessions, steps)
        except Exception as e:
            if len(batch) == 1:
                self._fail(batch[0][0], e)
                return
            logger.warning("A batch of %d steps failed (%r); running them one by one", len(batch), e)
            for member in batch:
                self._run_batch([member])
            return
        group = batch[0][0].group
        self._forward_time[group] = 0.7 * self._forward_time.get(group, 0.0) + 0.3 * (time.monotonic() - t0)
        for (job, n), out in zip(batch, outs, strict=True):
            job.outputs.append(out)
            if n == job.tokens:
                result = job.outputs[0] if len(job.outputs) == 1 else torch.cat(job.outputs, dim=1)
                _deliver(job.loop, job.future, result=result.cpu())
            else:  # the rest of a chunked prefill waits for the next batch
                job.offset += n
                job.hidden, job.positions, job.mask = job.hidden[:, n:], job.positions[:, n:], job.mask[:, n:]

    def _fail(self, job: _StepJob, error: BaseException) -> None:
        with self._cond:
            if job in self._steps:
                self._steps.remove(job)
        _deliver(job.loop, job.future, exception=error)


def _deliver(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future, *, result: Any = None, exception=None
) -> None:
    def settle() -> None:
        if future.done():
            return
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the submitter's loop is closed: nobody waits for this result
        pass
