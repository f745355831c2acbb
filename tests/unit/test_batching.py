"""Continuous batching in the compute worker: concurrent sessions' steps run as one forward, each session's
outputs equal to its solo run; long prefills go in chunks; a failing or cancelled step affects only its own
session; with batching off, steps run one at a time as before."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from corolla.models.lora import use_adapter
from corolla.models.session import KVSession
from corolla.models.stack import BlockStack
from corolla.server.compute import ComputeWorker

ATOL = 1e-4


@pytest.fixture(scope="module")
def stack(tiny_llama):
    return BlockStack.load(str(tiny_llama), 0, 8, dtype=torch.float32, progress=False)


def _sequence(stack, length: int, seed: int, pad: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, length, stack.config.hidden_size, generator=g)
    mask = torch.ones(1, length, dtype=torch.bool)
    mask[:, :pad] = False
    return hidden, (mask.long().cumsum(-1) - 1).clamp(min=0), mask


class Gate:
    """Holds the compute thread (a job that waits) so that the steps submitted meanwhile queue up."""

    def __init__(self, worker: ComputeWorker):
        self.worker, self.release = worker, threading.Event()

    async def hold(self):
        return await self.worker.submit(0, self.release.wait)


def _run_sessions(stack, worker: ComputeWorker, plans, hold_first: bool = True):
    """Each plan (length, prefill, pad) is one session: a prefill then one-token steps, all sessions
    concurrently. Returns their outputs ([1, length, H] each)."""

    async def session(plan, seed):
        length, prefill, pad = plan
        hidden, positions, mask = _sequence(stack, length, seed, pad)
        kv = KVSession(stack, 0, 8, 1, length)
        sizes = [prefill] + [1] * (length - prefill)
        outs, offset = [], 0
        for size in sizes:
            sl = slice(offset, offset + size)
            outs.append(await worker.submit_step(kv, offset, hidden[:, sl], positions[:, sl], mask[:, sl]))
            offset += size
        return torch.cat(outs, dim=1)

    async def main():
        gate = Gate(worker)
        held = asyncio.ensure_future(gate.hold()) if hold_first else None
        tasks = [asyncio.ensure_future(session(plan, seed)) for seed, plan in enumerate(plans)]
        await asyncio.sleep(0.05)
        gate.release.set()
        if held is not None:
            await held
        return await asyncio.gather(*tasks)

    return asyncio.run(main())


def _solo(stack, plan, seed):
    length, prefill, pad = plan
    hidden, positions, mask = _sequence(stack, length, seed, pad)
    kv = KVSession(stack, 0, 8, 1, length)
    with torch.inference_mode():
        return kv.step(0, hidden, positions, mask)


PLANS = [(12, 5, 0), (9, 2, 3), (16, 10, 0), (7, 7, 0), (10, 1, 2), (11, 4, 0)]


def test_concurrent_sessions_batch_and_match_their_solo_runs(stack):
    worker = ComputeWorker(max_batch_tokens=256)
    try:
        outs = _run_sessions(stack, worker, PLANS)
        stats = worker.take_stats()
    finally:
        worker.shutdown()
    for seed, plan in enumerate(PLANS):
        torch.testing.assert_close(outs[seed], _solo(stack, plan, seed), atol=ATOL, rtol=0)
    assert stats.steps > stats.batches  # sessions shared forwards
    assert stats.mean_sessions > 1.5


def test_a_long_prefill_goes_in_chunks_while_short_steps_continue(stack):
    """A 40-token prefill under a 16-token budget takes several batches, each also carrying the one-token
    steps of the other sessions; its output equals the unchunked one."""
    plans = [(40, 40, 0), (10, 1, 0), (10, 1, 0)]
    worker = ComputeWorker(max_batch_tokens=16)
    batches = []
    original = worker._run_batch

    def recording(batch):
        batches.append([(job.session.max_length, tokens) for job, tokens in batch])
        original(batch)

    worker._run_batch = recording
    try:
        outs = _run_sessions(stack, worker, plans)
    finally:
        worker.shutdown()
    for seed, plan in enumerate(plans):
        torch.testing.assert_close(outs[seed], _solo(stack, plan, seed), atol=ATOL, rtol=0)
    prefill_chunks = [tokens for batch in batches for length, tokens in batch if length == 40]
    assert len(prefill_chunks) >= 3 and sum(prefill_chunks) == 40
    assert all(sum(tokens for _, tokens in batch) <= 16 for batch in batches)
    # while the prefill was in chunks, the short sessions' steps rode along in the same batches
    assert any(len(batch) > 1 for batch in batches if any(length == 40 for length, _ in batch))


def test_batching_off_runs_steps_one_at_a_time_whole(stack):
    worker = ComputeWorker(batching=False, max_batch_tokens=4)
    try:
        outs = _run_sessions(stack, worker, PLANS[:3])
        stats = worker.take_stats()
    finally:
        worker.shutdown()
    for seed, plan in enumerate(PLANS[:3]):
        torch.testing.assert_close(outs[seed], _solo(stack, plan, seed), atol=ATOL, rtol=0)
    assert stats.steps == stats.batches  # one step per forward, prefills whole despite the tiny budget


def test_a_failing_step_fails_alone(stack):
    """A step that raises inside a batch is re-run alone: only its session gets the error."""
    worker = ComputeWorker()

    async def main():
        gate = Gate(worker)
        held = asyncio.ensure_future(gate.hold())
        good = [_sequence(stack, 3, seed) for seed in range(3)]
        sessions = [KVSession(stack, 0, 8, 1, 3) for _ in range(4)]
        tasks = [asyncio.ensure_future(worker.submit_step(kv, 0, *seq)) for kv, seq in zip(sessions, good)]
        hidden, positions, mask = _sequence(stack, 3, 9)
        bad = asyncio.ensure_future(worker.submit_step(sessions[3], 0, hidden, positions, mask[:, :2]))
        await asyncio.sleep(0.05)
        gate.release.set()
        await held
        return await asyncio.gather(*tasks), await asyncio.gather(bad, return_exceptions=True)

    try:
        outs, (error,) = asyncio.run(main())
    finally:
        worker.shutdown()
    assert isinstance(error, Exception)
    for seed, out in enumerate(outs):
        torch.testing.assert_close(out, _solo(stack, (3, 3, 0), seed), atol=ATOL, rtol=0)


def test_a_cancelled_step_leaves_the_queue_at_once(stack):
    worker = ComputeWorker()

    async def main():
        gate = Gate(worker)
        held = asyncio.ensure_future(gate.hold())
        kv = KVSession(stack, 0, 8, 1, 4)
        step = asyncio.ensure_future(worker.submit_step(kv, 0, *_sequence(stack, 4, 0)))
        await asyncio.sleep(0.05)
        queued = worker.queued_steps
        step.cancel()
        await asyncio.gather(step, return_exceptions=True)
        left = worker.queued_steps
        gate.release.set()
        await held
        return queued, left, kv.length

    try:
        queued, left, length = asyncio.run(main())
    finally:
        worker.shutdown()
    assert (queued, left, length) == (1, 0, 0)  # dropped unrun: the session's cache never changed


def test_steps_under_different_adapters_never_share_a_forward(stack):
    """The batch key includes the active adapter: steps submitted under different adapters go in separate
    forwards (here two distinct adapter objects stand in for fused LoRA weights)."""
    worker = ComputeWorker()
    batches = []
    original = worker._run_batch

    def recording(batch):
        batches.append(len(batch))
        original(batch)

    worker._run_batch = recording

    async def main():
        gate = Gate(worker)
        held = asyncio.ensure_future(gate.hold())
        tasks, adapter = [], {}  # an empty fused adapter: changes nothing numerically
        for i in range(4):
            kv = KVSession(stack, 0, 8, 1, 2)
            with use_adapter(None if i % 2 else adapter):
                tasks.append(asyncio.ensure_future(worker.submit_step(kv, 0, *_sequence(stack, 2, i))))
        await asyncio.sleep(0.05)
        gate.release.set()
        await held
        return await asyncio.gather(*tasks)

    try:
        asyncio.run(main())
    finally:
        worker.shutdown()
    assert batches == [2, 2]


def test_a_step_waits_for_recently_active_sessions_but_not_for_closed_or_idle_ones(stack):
    """Sessions that stepped lately and are not waiting are on their way: the worker holds a waiting step
    back (at most half a forward) for them to join its batch; a closed session is never waited for."""
    worker = ComputeWorker(max_gather_wait=60.0)  # a window no test machine's pauses reach

    async def main():
        sessions = [KVSession(stack, 0, 8, 1, 8) for _ in range(2)]
        x, p, m = _sequence(stack, 2, 0)
        await asyncio.gather(*(worker.submit_step(kv, 0, x[:, :1], p[:, :1], m[:, :1]) for kv in sessions))
        gate = Gate(worker)
        held = asyncio.ensure_future(gate.hold())
        await asyncio.sleep(0.05)
        step = asyncio.ensure_future(worker.submit_step(sessions[0], 1, x[:, 1:], p[:, 1:], m[:, 1:]))
        await asyncio.sleep(0.05)
        with worker._cond:
            group = worker._steps[0].group
            worker._forward_time[group] = 1000.0  # a slow forward: the window is the cap, not half a forward
            first = worker._gather_wait()
        sessions[1].close()
        with worker._cond:
            second = worker._gather_wait()
        gate.release.set()
        await held
        await step
        return first, second

    try:
        first, second = asyncio.run(main())
    finally:
        worker.shutdown()
    assert 0 < first <= 60.0  # waits for session 1 (recent, open), at most max_gather_wait
    assert second == 0  # session 1 closed: nobody to wait for
