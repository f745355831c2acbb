"""Every call validates what it receives: each bad request gets an error naming the problem, and the
server keeps serving (checked after each case with a ping and a correct forward). Also the KV-cache
budget: a session that does not fit waits, then fails clearly."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch
from swarm_harness import make_manager

from corolla.wire.errors import (
    BadRequestError,
    CacheFullError,
    RemoteError,
    ServerRefusedError,
    SessionLengthError,
)
from corolla.wire.framing import HEADER, read_message
from corolla.wire.messages import (
    ErrorResponse,
    ForwardRequest,
    ForwardResponse,
    InferenceOpen,
    InferenceOpened,
    InferenceStep,
    InferenceStepResult,
    InfoRequest,
    InfoResponse,
    Kind,
    ModelRef,
    PingRequest,
    PingResponse,
)
from corolla.wire.records import WIRE_VERSION, ServerState


def _forward(model: ModelRef, start=0, end=4, hidden=None, positions=None, mask=None) -> ForwardRequest:
    hidden = torch.randn(1, 3, 64) if hidden is None else hidden
    positions = torch.arange(3)[None] if positions is None else positions
    mask = torch.ones(1, 3, dtype=torch.bool) if mask is None else mask
    return ForwardRequest(model, start, end, hidden, positions, mask)


@pytest.fixture
def s0(manager, shared_swarm):
    """(run, peer id) for raw calls to the server hosting [0, 4); checks it still serves after the test."""
    peer = shared_swarm.servers["s0"].peer_id
    run = manager.bridge.run
    yield run, peer
    assert run(manager.transport.call(peer, PingRequest(), PingResponse, 5))
    good = run(manager.transport.call(peer, _forward(manager.model), ForwardResponse, 10))
    assert good.hidden.shape == (1, 3, 64)


BAD_FORWARDS = {
    "hidden size": (lambda m: _forward(m, hidden=torch.randn(1, 3, 63)), BadRequestError, "hidden states must be"),
    "hidden dtype": (
        lambda m: _forward(m, hidden=torch.ones(1, 3, 64, dtype=torch.int64)),
        BadRequestError,
        "floating point",
    ),  # fmt: skip
    "positions dtype": (lambda m: _forward(m, positions=torch.zeros(1, 3)), BadRequestError, "positions must be"),
    "mask shape": (
        lambda m: _forward(m, mask=torch.ones(1, 2, dtype=torch.bool)),
        BadRequestError,
        "attention_mask",
    ),
    "blocks outside": (lambda m: _forward(m, start=2, end=6), BadRequestError, "not within this server's blocks"),
    "empty range": (lambda m: _forward(m, start=3, end=3), BadRequestError, "not within"),
    "other model": (lambda m: _forward(ModelRef(m.dht_prefix, "0" * 64)), ServerRefusedError, "config hash"),
}


@pytest.mark.parametrize("case", sorted(BAD_FORWARDS))
def test_bad_forward_is_refused_with_reason(manager, s0, case):
    run, peer = s0
    make, error, text = BAD_FORWARDS[case]
    with pytest.raises(error, match=text):
        run(manager.transport.call(peer, make(manager.model), ForwardResponse, 10))


async def _raw_exchange(transport, peer: str, frame: bytes):
    conn = await transport.connect(peer)
    try:
        conn.writer.write(frame)
        await conn.writer.drain()
        return await asyncio.wait_for(read_message(conn.reader), 10)
    finally:
        conn.close()


RAW_FRAMES = {
    "oversized": (HEADER.pack(2**31, WIRE_VERSION, Kind.PING_REQUEST), "bad_request", "over the"),
    "wire version": (HEADER.pack(1, 99, Kind.PING_REQUEST) + b"\x90", "refused", "wire version 99"),
    "unknown kind": (HEADER.pack(1, WIRE_VERSION, 200) + b"\x90", "bad_request", "unknown message kind"),
    "garbage": (
        HEADER.pack(4, WIRE_VERSION, Kind.FORWARD_REQUEST) + b"\xc1\xc1\xc1\xc1",
        "bad_request",
        "malformed",
    ),
    "wrong arity": (HEADER.pack(2, WIRE_VERSION, Kind.FORWARD_REQUEST) + b"\x91\x01", "bad_request", "expected 7"),
    "not a call": (None, "bad_request", "cannot start a call"),
    "tensor bytes": (None, "bad_request", "needs 768 bytes"),
}


def _frame(kind: Kind, obj) -> bytes:
    payload = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(payload), WIRE_VERSION, kind) + payload


@pytest.mark.parametrize("case", sorted(RAW_FRAMES))
def test_malformed_frames_are_answered_with_errors(manager, s0, case):
    run, peer = s0
    frame, code, text = RAW_FRAMES[case]
    if case == "not a call":
        frame = _frame(Kind.PING_RESPONSE, [1.0])
    elif case == "tensor bytes":  # declares [1, 3, 64] float32 but carries fewer bytes
        model = [manager.model.dht_prefix, manager.model.config_hash]
        tensor = ["float32", [1, 3, 64], "float32", b"\x00" * 10]
        frame = _frame(Kind.FORWARD_REQUEST, [model, 0, 4, tensor, tensor, tensor, ""])
    reply = run(_raw_exchange(manager.transport, peer, frame))
    assert isinstance(reply, ErrorResponse) and reply.code == code
    assert text in reply.message


async def _session(transport, peer: str, model: ModelRef, steps, max_length=8):
    """Open a session on [0, 4) and send ``steps`` (offset, tokens); return each reply or error."""
    conn = await transport.connect(peer)
    replies = []
    try:
        await conn.send(InferenceOpen(model, 0, 4, max_length, 1))
        await conn.recv(InferenceOpened)
        for offset, tokens in steps:
            hidden, positions = torch.randn(1, tokens, 64), torch.arange(offset, offset + tokens)[None]
            await conn.send(InferenceStep(offset, hidden, positions, torch.ones(1, tokens, dtype=torch.bool)))
            try:
                replies.append(await asyncio.wait_for(conn.recv(InferenceStepResult), 10))
            except RemoteError as e:
                replies.append(e)
    finally:
        conn.close()
    return replies


def test_inference_step_errors_keep_the_session_usable(manager, s0):
    run, peer = s0
    replies = run(
        _session(manager.transport, peer, manager.model, [(0, 3), (0, 9), (7, 1), (3, 1), (4, 4), (8, 1)])
    )
    ok, too_long, gap, ok2, ok3, full = replies
    assert isinstance(ok, InferenceStepResult) and isinstance(ok2, InferenceStepResult)
    assert isinstance(ok3, InferenceStepResult)
    assert isinstance(too_long, SessionLengthError) and "max_length 8" in str(too_long)
    assert isinstance(gap, BadRequestError) and "past the session's 3 cached tokens" in str(gap)
    assert isinstance(full, SessionLengthError)


def test_session_over_server_max_length_is_refused(manager, s0):
    run, peer = s0
    with pytest.raises(SessionLengthError, match="inference_max_length"):
        run(_session(manager.transport, peer, manager.model, [], max_length=10**6))


def test_cache_budget_waits_then_fails_clearly(shared_swarm, tiny_llama):
    # 16 tokens per block x 2 blocks = 32 block-tokens; a session of max_length 12 over 2 blocks takes 24; one
    # client fills the budget here, so its per-client share is off (tests/unit/test_client_limits.py has that)
    proc = shared_swarm.start_server("small", tiny_llama, "--block_indices", "0:2", "--dht_prefix", "budget",
                                     "--attn_cache_tokens", "16", "--max_alloc_timeout", "1",
                                     "--max_client_cache_share", "1", wait=False)  # fmt: skip
    shared_swarm.wait_state(proc, ServerState.ONLINE, "budget")
    manager = make_manager(tiny_llama, shared_swarm.initial_peers, dht_prefix="budget")
    model, transport, run = manager.model, manager.transport, manager.bridge.run

    async def scenario():
        first = await transport.connect(proc.peer_id)
        await first.send(InferenceOpen(model, 0, 2, 12, 1))
        await first.recv(InferenceOpened)
        second = await transport.connect(proc.peer_id)
        await second.send(InferenceOpen(model, 0, 2, 12, 1))
        with pytest.raises(CacheFullError, match="stayed full for 1.0 s"):
            await asyncio.wait_for(second.recv(InferenceOpened), 30)
        with pytest.raises(CacheFullError, match="whole budget is 32"):
            await transport.call(proc.peer_id, InferenceOpen(model, 0, 2, 40, 1), InferenceOpened, 10)
        first.close()  # frees its 24 block-tokens: the next session fits
        for _ in range(100):  # the server frees them when it reads the EOF; its info shows when
            reply = await transport.call(proc.peer_id, InfoRequest(), InfoResponse, 10)
            if reply.info.free_cache_tokens == 16:
                break
            await asyncio.sleep(0.1)
        assert reply.info.free_cache_tokens == 16
        third = await transport.connect(proc.peer_id)
        await third.send(InferenceOpen(model, 0, 2, 12, 1))
        assert isinstance(await asyncio.wait_for(third.recv(InferenceOpened), 30), InferenceOpened)
        third.close()

    try:
        run(scenario())
    finally:
        manager.shutdown()
