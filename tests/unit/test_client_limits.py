"""Limits per client: a greedy peer that reaches a bound (sessions, KV-cache share, open calls, compute jobs) is
refused at once with an error naming the bound, while another peer keeps being served with exact outputs;
idle and half-open calls end and give back what they held; clients with waiting jobs take turns (fair
queueing: order is asserted, never speed)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from corolla.models.session import KVSession
from corolla.models.stack import BlockStack
from corolla.server.backend import BlockBackend
from corolla.server.client_limits import PeerCounter
from corolla.server.compute import PRIORITY_FORWARD, ComputeWorker, current_client
from corolla.server.config import LimitsConfig
from corolla.server.handlers import RequestHandler
from corolla.server.memory_cache import MemoryCache
from corolla.swarm.memory import InMemoryNetwork
from corolla.wire.errors import CacheFullError, ClientLimitError, ServerBusyError
from corolla.wire.framing import encode_frame, read_message
from corolla.wire.messages import (
    ErrorResponse,
    ForwardRequest,
    ForwardResponse,
    InferenceOpen,
    InferenceOpened,
    InferenceStep,
    InferenceStepResult,
    ModelRef,
    PingRequest,
    PingResponse,
    PushedStep,
)

MODEL = ModelRef("tiny", "hash")
ATOL = 1e-5
#: bound on every wait for something the server does on its own (an upper bound, never asserted)
WAIT = 30.0


@pytest.fixture(scope="module")
def stack(tiny_llama):
    return BlockStack.load(str(tiny_llama), 0, 8, dtype=torch.float32, progress=False)


def _inputs(length: int, seed: int, rows: int = 1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, length, 64, generator=g)
    return (
        hidden,
        torch.arange(length).expand(rows, length).contiguous(),
        torch.ones(rows, length, dtype=torch.bool),
    )


def _expected(stack, seeds, length: int = 8, rows: int = 1) -> dict[int, torch.Tensor]:
    """The blocks' own outputs, computed before the server runs (never beside its compute thread)."""
    with torch.inference_mode():
        return {seed: stack(*_inputs(length, seed, rows)) for seed in seeds}


class Server:
    """One server's production stack (worker, backend, KV budget, handler) on an in-memory network."""

    def __init__(self, stack, limits: LimitsConfig, cache_tokens=64, request_timeout=30.0, session_timeout=30.0):
        self.worker = ComputeWorker(max_client_jobs=limits.max_client_jobs)
        self.memory = MemoryCache(cache_tokens * 8, 30.0, max_client_share=limits.max_client_cache_share)
        self.handler = RequestHandler(
            BlockBackend(stack, self.worker), self.memory, MODEL, lambda: None, inference_max_length=64,
            max_batch_size=8, request_timeout=request_timeout, session_timeout=session_timeout,
            max_message_bytes=2**24, limits=limits,
        )  # fmt: skip
        self.network = InMemoryNetwork()
        self.network.add_peer("server", self.handler)

    async def connect(self, client: str):
        return await self.network.transport(caller=client).connect("server", 2**24)

    async def open_session(self, client: str, max_length: int = 16):
        conn = await self.connect(client)
        await conn.send(InferenceOpen(MODEL, 0, 8, max_length, 1))
        await conn.recv(InferenceOpened)
        return conn

    async def generate(self, client: str, seed: int, expected: torch.Tensor) -> None:
        """A session of a prefill and one-token steps whose outputs must equal ``expected``."""
        hidden, positions, mask = _inputs(8, seed)
        conn = await self.open_session(client)
        try:
            outs = []
            for start, end in [(0, 5), (5, 6), (6, 7), (7, 8)]:
                await conn.send(
                    InferenceStep(start, hidden[:, start:end], positions[:, start:end], mask[:, start:end])
                )
                outs.append((await conn.recv(InferenceStepResult)).hidden)
        finally:
            conn.close()
        torch.testing.assert_close(torch.cat(outs, 1), expected, atol=ATOL, rtol=0)

    def close(self) -> None:
        self.worker.shutdown()

    def run(self, scenario) -> None:
        """Run ``scenario`` (a coroutine) on a fresh event loop, then stop the server's compute worker."""
        try:
            asyncio.run(scenario)
        finally:
            self.close()


async def _until(condition) -> None:
    """Wait (bounded) for something the server does on its own, such as noticing a closed stream."""
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.005)


class Gate:
    """Holds the compute thread with a job of the server's own, so that what is submitted meanwhile queues."""

    def __init__(self, worker: ComputeWorker):
        self.release, self.started = threading.Event(), threading.Event()
        self.task = asyncio.ensure_future(worker.submit(0, self._hold))

    def _hold(self) -> None:
        self.started.set()
        self.release.wait()

    async def opened(self) -> None:
        self.release.set()
        await self.task


# -- the counter itself ------------------------------------------------------------------------------


def test_peer_counter_bounds_each_peer_and_never_the_server():
    counter = PeerCounter(2, lambda held, limit: ServerBusyError(f"{held} of {limit}"))
    a1, a2 = counter.acquire("a"), counter.acquire("a")
    with pytest.raises(ServerBusyError, match="2 of 2"):
        counter.acquire("a")
    with counter.acquire("b"):  # another peer has its own bound
        assert counter.held("b") == 1
    assert counter.held("b") == 0
    a1.release()
    a1.release()  # a second release gives nothing back twice
    assert counter.held("a") == 1
    counter.acquire("a")
    a2.release()
    for _ in range(5):  # the server's own work (no peer) is never bounded
        counter.acquire(None)
    assert PeerCounter(0, None).acquire("a") is not None  # 0 = no bound
    with pytest.raises(ValueError, match=">= 0"):
        PeerCounter(-1, None)


def test_the_client_is_told_of_its_own_limits_and_avoids_a_busy_server_briefly():
    from corolla.client.config import ClientConfig
    from corolla.client.failure_policy import FailurePolicy

    policy = FailurePolicy(ClientConfig(max_retries=5))
    with pytest.raises(ClientLimitError):  # the client's own doing: raised to the user, nobody banned
        policy.note_failure("server", ClientLimitError("over --max_client_sessions"), 1)
    assert not policy.is_banned("server")
    policy.note_failure("server", ServerBusyError("over --max_client_jobs"), 1)  # drains by itself: go elsewhere
    assert policy.is_banned("server")


# -- KV-cache share ----------------------------------------------------------------------------------


def test_cache_share_counts_held_and_waiting_reservations():
    async def go():
        cache = MemoryCache(100, alloc_timeout=WAIT, max_client_share=0.6)
        async with cache.reserve(60, client="b"), cache.reserve(30, client="a"):
            # a's next reservation fits its share (50 of 60) but not the cache: it waits...
            waiting = asyncio.ensure_future(cache.reserve(20, client="a").__aenter__())
            await _until(lambda: cache.client_used("a") == 50)
            assert not waiting.done()
            # ...and counts: one more would bring a to 70 of its 60, refused at once although the other waits
            with pytest.raises(
                ClientLimitError, match=r"70 block-tokens.*share of 60 \(0.6 of 100, --max_client_cache_share"
            ):
                async with cache.reserve(20, client="a"):
                    pass
            with pytest.raises(CacheFullError, match="whole budget"):  # bigger than the cache: as before
                async with cache.reserve(101, client="a"):
                    pass
        await waiting  # b's release let it in
        assert cache.client_used("a") == 20 and cache.client_used("b") == 0
        async with cache.reserve(80):  # the server's own reservations have no share
            pass

    asyncio.run(go())


def test_a_client_over_its_cache_share_is_refused_while_another_is_served(stack):
    # 512 block-tokens, half per client; a session of max_length 16 over 8 blocks takes 128
    server = Server(stack, LimitsConfig(max_client_cache_share=0.5), cache_tokens=64)
    expected = _expected(stack, [1, 2])

    async def go():
        held = [await server.open_session("greedy"), await server.open_session("greedy")]
        with pytest.raises(ClientLimitError, match="over its share of 256.*--max_client_cache_share"):
            await server.open_session("greedy")  # the cache has 256 free: refused for the share, not queued
        assert server.memory.free == 256
        await asyncio.gather(*(server.generate("polite", seed, out) for seed, out in expected.items()))
        held.pop().close()
        await _until(lambda: server.memory.client_used("greedy") == 128)
        held.append(await server.open_session("greedy"))  # a closed session gave its share back
        for conn in held:
            conn.close()

    server.run(go())


# -- sessions, open calls, idle and half-open ---------------------------------------------------------


def test_a_client_over_its_sessions_is_refused_while_another_is_served(stack):
    server = Server(stack, LimitsConfig(max_client_sessions=2, max_client_cache_share=1.0))
    expected = _expected(stack, [3, 4])

    async def go():
        held = [await server.open_session("greedy", 4) for _ in range(2)]
        with pytest.raises(
            ClientLimitError, match="2 inference sessions open or waiting.*--max_client_sessions 2"
        ):
            await server.open_session("greedy", 4)
        await asyncio.gather(*(server.generate("polite", seed, out) for seed, out in expected.items()))
        held.pop().close()
        await _until(lambda: server.handler.client_sessions.held("greedy") == 1)
        held.append(await server.open_session("greedy", 4))
        for conn in held:
            conn.close()

    server.run(go())


def test_idle_streams_are_bounded_per_client(stack):
    server = Server(stack, LimitsConfig(max_client_calls=3))

    async def go():
        idle = [await server.network.open_stream("greedy", "server") for _ in range(3)]  # never send a byte
        await _until(lambda: server.handler.client_calls.held("greedy") == 3)
        reader, writer = await server.network.open_stream("greedy", "server")
        refusal = await read_message(reader)
        assert isinstance(refusal, ErrorResponse) and refusal.code == ServerBusyError.code
        assert "3 calls open here" in refusal.message and "--max_client_calls 3" in refusal.message
        assert await reader.read() == b""  # and the stream is closed at once
        writer.close()
        conn = await server.connect("polite")  # others are served
        await conn.send(PingRequest())
        await conn.recv(PingResponse)
        conn.close()
        idle[0][1].close()  # a closed stream gives its place back
        await _until(lambda: server.handler.client_calls.held("greedy") == 2)
        conn = await server.connect("greedy")
        await conn.send(PingRequest())
        await conn.recv(PingResponse)
        conn.close()
        for _, w in idle[1:]:
            w.close()

    server.run(go())


def test_an_idle_stream_and_a_half_open_session_end_and_give_back_what_they_held(stack):
    server = Server(stack, LimitsConfig(), request_timeout=0.2, session_timeout=0.2)

    async def go():
        reader, writer = await server.network.open_stream("greedy", "server")  # sends nothing
        answer = await asyncio.wait_for(read_message(reader), WAIT)
        assert isinstance(answer, ErrorResponse) and "request took over" in answer.message
        writer.close()
        conn = await server.open_session("greedy")  # opened, never stepped
        with pytest.raises(ServerBusyError, match="no step for"):
            await asyncio.wait_for(conn.recv(), WAIT)
        conn.close()
        handler = server.handler
        await _until(lambda: handler.client_calls.held("greedy") == 0)
        assert handler.client_sessions.held("greedy") == 0 and server.memory.client_used("greedy") == 0
        assert server.memory.free == server.memory.capacity

    server.run(go())


def test_push_streams_leave_the_calls_bound_and_are_bounded_per_session(stack):
    """A server pushes over one stream per session it serves, for many clients: its push streams do not count
    as its calls, but at most MAX_PUSH_STREAMS may be open to one session."""
    from corolla.server.handlers import MAX_PUSH_STREAMS

    server = Server(stack, LimitsConfig(max_client_calls=2))
    session_id, token = b"s" * 16, b"t" * 16
    hidden, positions, mask = _inputs(1, 0)

    async def go():
        conn = await server.connect("client")
        await conn.send(InferenceOpen(MODEL, 0, 8, 16, 1, session_id=session_id, push_token=token))
        await conn.recv(InferenceOpened)
        pushes = []
        for step_id in range(1, MAX_PUSH_STREAMS + 2):  # one more than allowed, all from the upstream server
            reader, writer = await server.network.open_stream("upstream", "server")
            writer.write(encode_frame(PushedStep(session_id, token, step_id, 0, hidden, positions, mask)))
            pushes.append((reader, writer))
            if step_id <= MAX_PUSH_STREAMS:  # delivered: the session answers its client
                assert (await conn.recv(InferenceStepResult)).step_id == step_id
        refusal = await read_message(pushes[-1][0])
        assert isinstance(refusal, ErrorResponse) and refusal.code == ServerBusyError.code
        assert f"{MAX_PUSH_STREAMS} push streams are open to this session" in refusal.message
        assert server.handler.client_calls.held("upstream") == 0  # 4 open push streams, yet no calls held
        pushes[0][1].close()  # a closed push stream makes room for another
        await _until(lambda: server.handler.push_streams.held(session_id) == MAX_PUSH_STREAMS - 1)
        reader, writer = await server.network.open_stream("upstream", "server")
        writer.write(encode_frame(PushedStep(session_id, token, 99, 0, hidden, positions, mask)))
        assert (await conn.recv(InferenceStepResult)).step_id == 99
        for _, w in [*pushes, (reader, writer)]:
            w.close()
        conn.close()

    server.run(go())


# -- compute jobs: a bound per client, and turns ------------------------------------------------------


def test_a_client_over_its_compute_jobs_is_refused_and_waits_no_longer_than_one_turn(stack):
    """Greedy fills its bound of queued forwards while the worker is held; its next one is refused. A polite
    forward sent after them runs second: one greedy job, then the polite one, then the rest of the flood."""
    server = Server(stack, LimitsConfig(max_client_jobs=4))
    ran: list[int] = []  # rows of each forward, in the order the worker ran them: 1 greedy, 2 polite
    backend = server.handler.backend
    original = backend._forward

    def recording(start, end, hidden, positions, mask):
        ran.append(hidden.shape[0])
        return original(start, end, hidden, positions, mask)

    backend._forward = recording
    expected = {**_expected(stack, range(5), 6), **_expected(stack, [5], 6, rows=2)}

    async def forward(client: str, rows: int, seed: int):
        hidden, positions, mask = _inputs(6, seed, rows)
        conn = await server.connect(client)
        try:
            await conn.send(ForwardRequest(MODEL, 0, 8, hidden, positions, mask))
            out = (await conn.recv(ForwardResponse)).hidden
        finally:
            conn.close()
        torch.testing.assert_close(out, expected[seed], atol=ATOL, rtol=0)

    async def go():
        gate = Gate(server.worker)
        flood = [asyncio.ensure_future(forward("greedy", 1, seed)) for seed in range(4)]
        await _until(lambda: server.worker.client_jobs("greedy") == 4)
        with pytest.raises(ServerBusyError, match="4 compute jobs waiting or running.*--max_client_jobs 4"):
            await forward("greedy", 1, 4)
        polite = asyncio.ensure_future(forward("polite", 2, 5))
        await _until(lambda: server.worker.client_jobs("polite") == 1)
        await gate.opened()
        await asyncio.gather(polite, *flood)

    server.run(go())
    assert ran == [1, 2, 1, 1, 1]


async def _as_client(client: str | None, coro_fn):
    current_client.set(client)  # this task's own context: what a request handler does for its call
    return await coro_fn()


def test_clients_take_turns_at_each_priority():
    """Jobs queued while the worker is held run by turns: the flooding client and the late ones alternate,
    inference before forward as always, and one client alone keeps its arrival order."""
    worker = ComputeWorker()
    ran: list[str] = []

    async def go():
        gate = Gate(worker)
        await asyncio.to_thread(gate.started.wait)
        jobs = []
        for client, priority, n in [("flood", PRIORITY_FORWARD, 4), ("late", PRIORITY_FORWARD, 2), ("flood", 0, 3),
                                    ("late", 0, 1), ("third", PRIORITY_FORWARD, 1)]:  # fmt: skip
            for i in range(n):
                name = f"{client}-{'fwd' if priority else 'inf'}{i}"
                jobs.append(
                    asyncio.ensure_future(
                        _as_client(client, lambda p=priority, n=name: worker.submit(p, ran.append, n))
                    )
                )
        await asyncio.sleep(0)  # every submission is queued before the gate opens
        await gate.opened()
        await asyncio.gather(*jobs)

    try:
        asyncio.run(go())
    finally:
        worker.shutdown()
    assert ran == [
        "flood-inf0", "late-inf0", "flood-inf1", "flood-inf2",
        "flood-fwd0", "late-fwd0", "third-fwd0", "flood-fwd1", "late-fwd1", "flood-fwd2", "flood-fwd3",
    ]  # fmt: skip


def test_batched_steps_take_turns_and_keep_their_outputs(stack):
    """A flood of prefills from one client (each filling a batch) and one prefill from another: the other's
    goes in the second batch, not after the flood; every output equals its solo run."""
    worker = ComputeWorker(max_batch_tokens=8)
    batches: list[list[str]] = []
    original = worker._run_batch

    def recording(batch):
        batches.append([job.context.run(current_client.get) for job, _ in batch])
        original(batch)

    worker._run_batch = recording
    expected = _expected(stack, [0, 1, 2, 3, 4, 7])

    async def step(seed: int):
        hidden, positions, mask = _inputs(8, seed)
        kv = KVSession(stack, 0, 8, 1, 8)
        out = await worker.submit_step(kv, 0, hidden, positions, mask)
        torch.testing.assert_close(out, expected[seed], atol=ATOL, rtol=0)

    async def go():
        gate = Gate(worker)
        await asyncio.to_thread(gate.started.wait)
        flood = [asyncio.ensure_future(_as_client("flood", lambda s=s: step(s))) for s in range(5)]
        await asyncio.sleep(0)
        late = asyncio.ensure_future(_as_client("late", lambda: step(7)))
        await asyncio.sleep(0)
        await gate.opened()
        await asyncio.gather(late, *flood)

    try:
        asyncio.run(go())
    finally:
        worker.shutdown()
    assert batches == [["flood"], ["late"], ["flood"], ["flood"], ["flood"], ["flood"]]
