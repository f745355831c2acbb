"""Server-to-server push of inference steps on a swarm in one process (tests/fake_swarm.py).

Exact outputs with push, relay of a lost or late push with each step computed once per server, and pushed
steps that must be refused (wrong token, closed session, bad offset or shape) changing no cache.
"""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from corolla.swarm.transport import Transport
from corolla.wire.errors import BadRequestError
from corolla.wire.messages import (
    InferenceOpen,
    InferenceOpened,
    InferenceStep,
    InferenceStepResult,
    PushedStep,
)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 10, 64, generator=g)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :2] = False
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return hidden, positions, mask


def _three_hops(swarm):
    swarm.add_server("a", 0, 3)
    swarm.add_server("b", 3, 6)
    swarm.add_server("c", 6, 8)


def _count_steps(swarm, peer: str) -> list[int]:
    """Record the cache offset of every step server ``peer`` computes."""
    handler = swarm.network._handlers[peer]
    backend, offsets = handler.backend, []
    original = backend.inference_step

    async def counting(session, offset, *args, **kwargs):
        offsets.append(offset)
        return await original(session, offset, *args, **kwargs)

    backend.inference_step = counting
    return offsets


def _run(swarm, inputs, prefill=4):
    hidden, positions, mask = inputs
    with swarm.manager.open_session(max_length=16) as session:
        outs = [session.step(hidden[:, :prefill], positions[:, :prefill], mask[:, :prefill])]
        for t in range(prefill, hidden.shape[1]):
            outs.append(session.step(hidden[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1]))
        return torch.cat(outs, dim=1), session.relayed_pushes, session.failovers


def _expected(swarm, inputs):
    return swarm.reference()(*inputs)


def test_pushed_steps_give_the_relayed_outputs(make_swarm, inputs):
    outputs = {}
    for push in (True, False):
        swarm = make_swarm(push=push, step_timeout_floor=30.0)  # under load a push is slow, never "late"
        _three_hops(swarm)
        counts = {peer: _count_steps(swarm, peer) for peer in "abc"}
        outputs[push], relayed, failovers = _run(swarm, inputs)
        assert relayed == 0 and failovers == 0
        assert all(offsets == [0, 4, 5, 6, 7, 8, 9] for offsets in counts.values())  # each step once
        # with push, the client opened one stream per server, and servers pushed to the next one
        assert swarm.network.dials_from.get(("a", "b"), 0) == (1 if push else 0)
        assert swarm.network.dials_from.get(("b", "c"), 0) == (1 if push else 0)
    torch.testing.assert_close(outputs[True], _expected(swarm, inputs), atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs[True], outputs[False], atol=0, rtol=0)


class _FailingTransport(Transport):
    async def open_stream(self, peer_id: str):
        raise ConnectionRefusedError("pushes are lost on purpose")


class _SlowTransport(Transport):
    """Delivers pushes after ``delay`` seconds: later than the client's deadline, so the client relays first."""

    def __init__(self, inner: Transport, delay: float):
        self.inner, self.delay = inner, delay

    async def open_stream(self, peer_id: str):
        await asyncio.sleep(self.delay)
        return await self.inner.open_stream(peer_id)


@pytest.mark.parametrize("fault", ["lost", "late"])
def test_a_lost_or_late_push_is_relayed_and_computed_once(make_swarm, inputs, fault):
    swarm = make_swarm(step_timeout_floor=0.1)
    _three_hops(swarm)
    handler = swarm.network._handlers["a"]
    if fault == "lost":
        handler.transport = _FailingTransport()
    else:
        handler.transport = _SlowTransport(handler.transport, 1.0)
    counts = _count_steps(swarm, "b")
    out, relayed, failovers = _run(swarm, inputs, prefill=4)
    torch.testing.assert_close(out, _expected(swarm, inputs), atol=1e-5, rtol=0)
    # after the first relay the client stops expecting pushes into b for this session: one relay, not one a step
    assert relayed == 1 and failovers == 0
    assert counts == [0, 4, 5, 6, 7, 8, 9]  # every step of b exactly once, whichever copy came first


def _open(swarm, peer, session_id, token):
    """A client's session on ``peer`` (blocks 3..6), opened by hand; returns its connection."""

    async def run():
        conn = await swarm.network.transport(swarm_key=swarm.swarm_key).connect(peer, 2**24)
        await conn.send(InferenceOpen(swarm.model, 3, 6, 16, 1, "", session_id, token))
        await conn.recv(InferenceOpened)
        return conn

    return swarm.manager.bridge.run(run())


def test_bad_pushes_are_refused_and_change_no_cache(make_swarm):
    swarm = make_swarm()
    swarm.add_server("b", 3, 6)
    session_id, token = os.urandom(16), os.urandom(16)
    conn = _open(swarm, "b", session_id, token)
    hidden, positions, mask = torch.randn(1, 2, 64), torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool)
    reference = swarm.stacks[3, 6](hidden, positions, mask)

    def push(step: PushedStep) -> str:
        async def run():
            pusher = await swarm.network.transport("intruder", swarm_key=swarm.swarm_key).connect("b", 2**24)
            await pusher.send(step)
            try:
                await pusher.recv()
            except BadRequestError as e:
                return e.message
            finally:
                pusher.close()

        return swarm.manager.bridge.run(run())

    good = dict(session_id=session_id, token=token, step_id=1, offset=0, hidden=hidden, positions=positions,
                attention_mask=mask)  # fmt: skip
    assert "wrong push token" in push(PushedStep(**{**good, "token": os.urandom(16)}))
    assert "wrong push token" in push(PushedStep(**{**good, "token": b""}))
    assert "not open here" in push(PushedStep(**{**good, "session_id": os.urandom(16)}))
    assert "offset 5 is past" in push(PushedStep(**{**good, "offset": 5}))
    assert "hidden states must be" in push(PushedStep(**{**good, "hidden": torch.randn(1, 2, 32)}))
    assert "batch size 1" in push(PushedStep(**{**good, "hidden": torch.randn(2, 2, 64)}))

    async def step_from_client():  # the session is untouched: its first step still lands at offset 0
        await conn.send(InferenceStep(0, hidden, positions, mask, 7))
        return await conn.recv(InferenceStepResult)

    result = swarm.manager.bridge.run(step_from_client())
    assert result.step_id == 7
    torch.testing.assert_close(result.hidden, reference, atol=1e-5, rtol=0)

    async def close():
        conn.close()
        await asyncio.sleep(0.05)

    swarm.manager.bridge.run(close())
    # a closed session takes no pushes
    assert "not open here" in push(PushedStep(**good))


def test_a_refused_session_id_reuse(make_swarm):
    swarm = make_swarm()
    swarm.add_server("b", 3, 6)
    session_id = os.urandom(16)
    first = _open(swarm, "b", session_id, os.urandom(16))
    with pytest.raises(BadRequestError, match="already open"):
        _open(swarm, "b", session_id, os.urandom(16))
    first.close()


def test_int8_activations_on_every_link(make_swarm, inputs):
    """Opt-in 8-bit activations: client -> server, server -> client and pushes all travel int8 (lossy, so the
    outputs are close to the exact ones, not equal)."""
    swarm = make_swarm(activation_compression="int8", step_timeout_floor=30.0)  # no push counts as late
    _three_hops(swarm)
    out, relayed, _ = _run(swarm, inputs)
    expected = _expected(swarm, inputs)
    assert relayed == 0
    error = (out - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.02
    with pytest.raises(ValueError, match="activation_compression"):
        make_swarm(activation_compression="int4")
