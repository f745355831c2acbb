"""Beam reordering (``hypo_ids``) through a chain (tests/fake_swarm.py): every server reorders its cache rows,
pushed steps carry the reorder on, and a failover replays the client's record in the caches' order."""

from __future__ import annotations

import pytest
import torch

from corolla.models.session import KVSession
from corolla.wire.errors import BadRequestError

ORDERS = [None, [1, 1, 0], [2, 0, 1], None, [0, 0, 0], [2, 1, 2]]


def _inputs():
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(3, 10, 64, generator=g)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, :2] = False
    return hidden, (mask.long().cumsum(-1) - 1).clamp(min=0), mask


def _steps():
    """A 4-token prefill, then one token per step, each with its reorder."""
    yield slice(0, 4), None
    for t, order in zip(range(4, 10), ORDERS):
        yield slice(t, t + 1), None if order is None else torch.tensor(order)


def _expected(swarm):
    hidden, positions, mask = _inputs()
    session = KVSession(swarm.reference(), 0, swarm.num_blocks, 3, 16)
    outs = []
    with torch.inference_mode():
        for sl, hypo in _steps():
            if hypo is not None:
                session.reorder(hypo)
            outs.append(session.step(sl.start, hidden[:, sl], positions[:, sl], mask[:, sl]))
    return torch.cat(outs, dim=1)


def _run(swarm, fault=None):
    hidden, positions, mask = _inputs()
    outs = []
    with swarm.manager.open_session(max_length=16) as session:
        for sl, hypo in _steps():
            if fault is not None and sl.start == 7:
                fault(session)
            outs.append(session.step(hidden[:, sl], positions[:, sl], mask[:, sl], hypo_ids=hypo))
        return torch.cat(outs, dim=1), session.failovers, session.relayed_pushes


@pytest.mark.parametrize("push", [True, False])
def test_every_server_reorders_its_cache(make_swarm, push):
    swarm = make_swarm(push=push, step_timeout_floor=30.0)  # no push is ever "late": all travel pushed
    swarm.add_server("a", 0, 3)
    swarm.add_server("b", 3, 6)
    swarm.add_server("c", 6, 8)
    out, failovers, relayed = _run(swarm)
    torch.testing.assert_close(out, _expected(swarm), atol=1e-5, rtol=0)
    assert failovers == 0 and relayed == 0


def test_a_failover_after_reorders_replays_the_reordered_record(make_swarm):
    swarm = make_swarm()
    swarm.add_server("a", 0, 4, latency=0.001)
    swarm.add_server("a2", 0, 4, latency=0.01)
    swarm.add_server("b", 4, 8)
    out, failovers, _ = _run(swarm, fault=lambda session: swarm.kill("a"))
    torch.testing.assert_close(out, _expected(swarm), atol=1e-5, rtol=0)
    assert failovers == 1


def test_bad_hypo_ids_are_refused(make_swarm):
    swarm = make_swarm()
    swarm.add_server("a", 0, 8)
    hidden, positions, mask = _inputs()
    with swarm.manager.open_session(max_length=16) as session:
        session.step(hidden[:, :4], positions[:, :4], mask[:, :4])
        with pytest.raises(ValueError, match="row indices"):
            session.step(hidden[:, 4:5], positions[:, 4:5], mask[:, 4:5], hypo_ids=torch.tensor([0, 3, 1]))
    # a server refuses them too (a client that skipped the check)
    handler = swarm.network._handlers["a"]
    kv = handler.backend.open_session(0, 8, 3, 8)

    async def step():
        return await handler.backend.inference_step(
            kv, 0, hidden[:, :1], positions[:, :1], mask[:, :1], None, torch.tensor([0, 1])
        )

    with pytest.raises(BadRequestError, match="hypo_ids"):
        swarm.manager.bridge.run(step())
