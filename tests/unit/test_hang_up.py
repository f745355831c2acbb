"""The caller hangs up first, on every call: a handler closes its end of a stream only after the caller closed
its own. Over p2pd, a handler closing first lets the daemon reset the stream, and the reset drops whatever part
of the reply the caller's daemon has not handed over yet (on a busy machine: replies cut at 32 KiB boundaries or
lost whole, the `IncompleteReadError`s of issue 15). The in-memory network counts handler-first closes."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from corolla.wire.errors import BadRequestError
from corolla.wire.framing import HEADER, read_message
from corolla.wire.messages import (
    ErrorResponse,
    ForwardRequest,
    ForwardResponse,
    InfoRequest,
    InfoResponse,
    PingRequest,
    PingResponse,
    PushedStep,
)
from corolla.wire.records import WIRE_VERSION


@pytest.fixture
def swarm(make_swarm):
    swarm = make_swarm()
    swarm.add_server("a", 0, 4)
    swarm.add_server("b", 4, 8)
    return swarm


async def _raw(transport, peer: str, frame: bytes):
    conn = await transport.connect(peer)
    try:
        conn.writer.write(frame)
        await conn.writer.drain()
        return await read_message(conn.reader)
    finally:
        conn.close()


def test_every_call_lets_the_caller_hang_up_first(swarm):
    manager, run = swarm.manager, swarm.manager.bridge.run
    transport = manager.transport
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 64, generator=g)
    positions = torch.arange(5).expand(2, 5).contiguous()
    mask = torch.ones(2, 5, dtype=torch.bool)

    assert isinstance(run(transport.call("a", PingRequest(), PingResponse, 10)), PingResponse)
    assert isinstance(run(transport.call("b", InfoRequest(), InfoResponse, 10)), InfoResponse)
    with torch.no_grad():
        manager.forward(hidden, positions, mask)  # ForwardRequest on each span
    leaf = hidden.clone().requires_grad_(True)
    manager.forward(leaf, positions, mask).sum().backward()  # TrainForwardRequest, then BackwardRequest
    with manager.open_session(max_length=8) as session:  # pushed from a to b, answered by both
        session.step(hidden[:, :4], positions[:, :4], mask[:, :4])
        session.step(hidden[:, 4:], positions[:, 4:], mask[:, 4:])
    with pytest.raises(BadRequestError, match="hidden states must be"):  # an error answer
        bad = ForwardRequest(manager.model, 0, 4, torch.randn(1, 3, 63), positions[:1, :3], mask[:1, :3])
        run(transport.call("a", bad, ForwardResponse, 10))
    # a frame refused after its header: the payload is never read
    reply = run(_raw(transport, "a", HEADER.pack(1, WIRE_VERSION, 200) + b"\x90"))
    assert isinstance(reply, ErrorResponse) and "unknown message kind" in reply.message

    run(asyncio.wait_for(swarm.network.settle(), 30))
    assert sum(swarm.network.dials.values()) >= 10
    assert swarm.network.handler_closed_first == {}


def test_a_refused_push_ends_its_stream_at_once(swarm):
    """The one exception: a pusher reads no replies, so a refused push stream is closed by the server (waiting
    for the pusher to hang up would swallow its next pushes instead of making it open a new stream)."""

    async def refused_push():
        conn = await swarm.network.transport("a", swarm_key=swarm.swarm_key).connect("b")
        try:
            step = PushedStep(os.urandom(16), os.urandom(16), 1, 0, torch.randn(1, 1, 64), torch.zeros(1, 1, dtype=torch.long),
                              torch.ones(1, 1, dtype=torch.bool))  # fmt: skip
            await conn.send(step)
            reply = await read_message(conn.reader)
            with pytest.raises(asyncio.IncompleteReadError):
                await asyncio.wait_for(read_message(conn.reader), 30)  # EOF, without the pusher closing first
            return reply
        finally:
            conn.close()

    reply = swarm.manager.bridge.run(refused_push())
    assert isinstance(reply, ErrorResponse) and "not open here" in reply.message
    assert swarm.network.handler_closed_first == {"b": 1}
