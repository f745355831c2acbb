"""Continuous batching through a chain (tests/fake_swarm.py: real handlers, backends and compute workers, the
real client): concurrent sessions of different lengths, left padding and deep prompts get their solo outputs;
a session failing over leaves the others' outputs untouched; the KV budget holds sessions back, not memory."""

from __future__ import annotations

import threading

import pytest
import torch

from corolla.models.deep_prompts import run_blocks
from corolla.wire.errors import CacheFullError

ATOL = 1e-5


def _inputs(seed: int, batch: int, length: int, pad: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, 64, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, :pad] = False
    return hidden, (mask.long().cumsum(-1) - 1).clamp(min=0), mask


#: per session: (batch, length, left padding of row 0, prefill)
PLANS = [(1, 10, 0, 4), (2, 8, 2, 3), (1, 12, 0, 1), (2, 9, 0, 9), (1, 7, 3, 5), (1, 11, 0, 2)]


def _run_concurrently(swarm, plans, prompts=None, before_step=None, max_length=16):
    """Each plan is a session in its own thread: a prefill, then one-token steps; all start together."""
    outs, errors = {}, []
    start = threading.Barrier(len(plans))

    def session(i):
        batch, length, pad, prefill = plans[i]
        hidden, positions, mask = _inputs(i, batch, length, pad)
        try:
            with swarm.manager.open_session(max_length=max_length, prompts=(prompts or {}).get(i)) as s:
                start.wait()
                steps = [(0, prefill)] + [(t, t + 1) for t in range(prefill, length)]
                chunks = []
                for a, b in steps:
                    if before_step is not None:
                        before_step(i, a)
                    chunks.append(s.step(hidden[:, a:b], positions[:, a:b], mask[:, a:b]))
                outs[i] = torch.cat(chunks, dim=1), s.failovers
        except BaseException as e:
            start.abort()
            errors.append(e)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs, errors


def _expected(swarm, plans, i, prompts=None):
    batch, length, pad, _ = plans[i]
    hidden, positions, mask = _inputs(i, batch, length, pad)
    stack = swarm.reference()
    with torch.no_grad():
        return run_blocks(stack, (0, stack.end), hidden, positions, mask, prompts)


def test_concurrent_sessions_share_forwards_and_keep_their_solo_outputs(make_swarm):
    swarm = make_swarm()
    swarm.add_server("a", 0, 4)
    swarm.add_server("b", 4, 8)
    outs, errors = _run_concurrently(swarm, PLANS)
    assert not errors
    for i in range(len(PLANS)):
        torch.testing.assert_close(outs[i][0], _expected(swarm, PLANS, i), atol=ATOL, rtol=0)
    stats = [worker.take_stats() for worker in swarm.workers]
    assert any(s.steps > s.batches for s in stats)  # some forwards carried several sessions


def test_a_deep_prompt_session_runs_beside_batched_ones(make_swarm):
    """Steps with deep prompts run alone (not batched); the sessions around them still batch; all exact."""
    swarm = make_swarm()
    swarm.add_server("a", 0, 8)
    g = torch.Generator().manual_seed(11)
    prompts = {0: torch.randn(8, 1, 3, 64, generator=g) * 0.1}
    plans = [(1, 10, 0, 4), (1, 9, 0, 2), (2, 8, 1, 3)]
    outs, errors = _run_concurrently(swarm, plans, prompts=prompts)
    assert not errors
    for i in range(len(plans)):
        torch.testing.assert_close(outs[i][0], _expected(swarm, plans, i, prompts.get(i)), atol=ATOL, rtol=0)


def test_a_session_fails_over_while_the_others_continue(make_swarm):
    swarm = make_swarm()
    swarm.add_server("a1", 0, 4, latency=0.001)  # preferred by every session
    swarm.add_server("a2", 0, 4, latency=0.01)
    swarm.add_server("b", 4, 8)
    killed = threading.Event()

    def kill_a1_once(i, position):
        if i == 0 and position == 6 and not killed.is_set():
            killed.set()
            swarm.kill("a1")

    outs, errors = _run_concurrently(swarm, PLANS, before_step=kill_a1_once)
    assert not errors and killed.is_set()
    for i in range(len(PLANS)):
        torch.testing.assert_close(outs[i][0], _expected(swarm, PLANS, i), atol=ATOL, rtol=0)
    assert outs[0][1] >= 1  # the killing session failed over (others did too if a1 was on their route)


def test_the_kv_budget_queues_sessions_instead_of_growing(make_swarm):
    """Room for two sessions per server: the other sessions wait for one to close, then run; every output
    is exact and no server ever held more sessions than its budget."""
    swarm = make_swarm()
    swarm.add_server("a", 0, 8, cache_tokens=2 * 16)  # 2 sessions of batch 1 and max_length 16
    handler = swarm.network._handlers["a"]
    most, original = [0], handler.backend.open_session

    def counting_open(*args):
        most[0] = max(most[0], handler.active_sessions + 1)
        return original(*args)

    handler.backend.open_session = counting_open
    plans = [(1, 10, 0, 4), (1, 8, 0, 2), (1, 9, 0, 3), (1, 7, 0, 7)]
    outs, errors = _run_concurrently(swarm, plans)
    assert not errors
    for i in range(len(plans)):
        torch.testing.assert_close(outs[i][0], _expected(swarm, plans, i), atol=ATOL, rtol=0)
    assert most[0] == 2 and handler.memory.used == 0


def test_a_session_that_never_gets_room_fails_with_cache_full(make_swarm):
    swarm = make_swarm(max_retries=0)
    swarm.add_server("a", 0, 8, cache_tokens=16, alloc_timeout=0.3)
    hidden, positions, mask = _inputs(0, 1, 2, 0)
    with swarm.manager.open_session(max_length=16) as holder:
        holder.step(hidden, positions, mask)
        with pytest.raises(CacheFullError, match="stayed full"):
            with swarm.manager.open_session(max_length=16) as waiter:
                waiter.step(hidden, positions, mask)
