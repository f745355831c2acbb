"""Every handler fuzzed (hypothesis) on the in-process swarm: random and mutated first frames, and mutated frames
inside an open inference session, get an ErrorResponse that names the problem (never an ``internal`` one), a
valid answer, or the stream closed; meanwhile a normal client keeps generating with exact outputs."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import msgpack
import pytest
import torch
from fake_swarm import FakeSwarm
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from wire_strategies import messages, msgpack_values

from corolla.wire.codec import to_obj
from corolla.wire.framing import HEADER, encode_frame, read_message
from corolla.wire.messages import (
    KINDS,
    ErrorResponse,
    InferenceOpen,
    InferenceOpened,
    InferenceStep,
    InferenceStepResult,
    Kind,
    MemberProof,
)
from corolla.wire.records import WIRE_VERSION

FUZZ = settings(
    max_examples=120,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: a hung example costs HANG s each try
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
#: how long a reply may take before the call counts as hung (generous: the machine may be busy)
HANG = 20.0


@pytest.fixture(scope="module")
def swarm(tiny_llama):
    swarm = FakeSwarm(tiny_llama)
    swarm.add_server("a", 0, 8)
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def normal_client(swarm):
    """A client generating (a prefill and one-token steps) in a loop while the tests fuzz; its outputs are checked
    against the local blocks at the end."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(1, 6, 64, generator=g)
    positions, mask = torch.arange(6)[None], torch.ones(1, 6, dtype=torch.bool)
    expected = swarm.reference()(hidden, positions, mask)
    stop, runs, failures = threading.Event(), [], []

    def generate():
        while not stop.is_set():
            try:
                with swarm.manager.open_session(max_length=8) as session:
                    outs = [session.step(hidden[:, :3], positions[:, :3], mask[:, :3])]
                    outs += [
                        session.step(hidden[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1])
                        for t in range(3, 6)
                    ]
                runs.append(torch.allclose(torch.cat(outs, 1), expected, atol=1e-5, rtol=0))
            except Exception as e:  # noqa: BLE001 - every failure of the normal client is reported below
                failures.append(repr(e))

    thread = threading.Thread(target=generate, name="normal-client", daemon=True)
    thread.start()
    yield runs, failures
    stop.set()
    thread.join(60)
    assert not failures, failures
    assert runs and all(runs), f"{runs.count(False)} of {len(runs)} generations differed"


def _mutate(data, message) -> bytes:
    """A frame of ``message`` broken one way: a field replaced, bytes flipped, another kind, or left as it is."""
    how = data.draw(st.sampled_from(["field", "bytes", "kind", "valid"]))
    if how == "bytes":
        frame = bytearray(encode_frame(message))
        for _ in range(data.draw(st.integers(1, 4))):
            frame[data.draw(st.integers(HEADER.size, len(frame) - 1))] = data.draw(st.integers(0, 255))
        return bytes(frame)  # the header (and so the length) is intact: the frame is complete
    obj = to_obj(message)
    if how == "field" and obj:
        i = data.draw(st.integers(0, len(obj) - 1))
        obj[i] = data.draw(msgpack_values)
    payload = msgpack.packb(obj, use_bin_type=True)
    kind = data.draw(st.sampled_from(sorted(Kind))) if how == "kind" else KINDS[type(message)]
    return HEADER.pack(len(payload), WIRE_VERSION, kind) + payload


async def _exchange(swarm, frames: list[bytes], opening: bool):
    """Send ``frames`` on one stream (after a valid InferenceOpen if ``opening``) up to the first error; the
    replies ('closed' for EOF)."""
    reader, writer = await swarm.network.open_stream("fuzzer", "a")
    replies = []
    writer.write(encode_frame(MemberProof(swarm.swarm_key.member_proof("fuzzer"))))  # a member: past the check
    try:
        if opening:
            writer.write(encode_frame(InferenceOpen(swarm.model, 0, 8, 8, 1)))
            replies.append(await asyncio.wait_for(read_message(reader), HANG))
            assert isinstance(replies[-1], InferenceOpened), replies
        for frame in frames:
            writer.write(frame)
            await writer.drain()
            try:
                replies.append(await asyncio.wait_for(read_message(reader), HANG))
            except asyncio.IncompleteReadError:
                replies.append("closed")
                break
            if isinstance(replies[-1], ErrorResponse):
                break  # the call may have ended: the server then discards what comes until we hang up
    finally:
        writer.close()
    return replies


def _check(replies) -> None:
    for reply in replies:
        if isinstance(reply, ErrorResponse):
            assert reply.code != "internal", reply.message  # a crash inside the handler, not the request's fault
            assert reply.message


def _with_model(data, message, swarm):
    """Often the server's own model, so the fuzz reaches past the model check."""
    if "model" in {f.name for f in dataclasses.fields(message)} and data.draw(st.booleans()):
        return dataclasses.replace(message, model=swarm.model)
    return message


@FUZZ
@given(data=st.data())
def test_first_frames_are_answered_or_closed(swarm, normal_client, data):
    message = _with_model(data, data.draw(messages), swarm)
    replies = swarm.manager.bridge.run(_exchange(swarm, [_mutate(data, message)], opening=False))
    _check(replies)


@FUZZ
@given(data=st.data())
def test_session_frames_are_answered_or_close_the_session(swarm, normal_client, data):
    if data.draw(st.booleans()):  # a plausible step: one token at the session's start
        step = InferenceStep(
            0, torch.randn(1, 1, 64), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
        )
    else:
        step = data.draw(messages)
    frames = [_mutate(data, step) for _ in range(data.draw(st.integers(1, 3)))]
    replies = swarm.manager.bridge.run(_exchange(swarm, frames, opening=True))
    _check(replies)
    assert all(
        isinstance(r, (InferenceOpened, InferenceStepResult, ErrorResponse)) or r == "closed" for r in replies
    )
