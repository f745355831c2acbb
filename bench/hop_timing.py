"""Where a swarm step's time goes: client-side timestamps, and each hop's round trip split with the server's.

``ClientProbe`` wraps a few corolla methods in the bench (client) process with ``time.perf_counter()`` stamps;
corolla itself is unchanged. The servers' stamps come from ``python -m bench.common probe_server``. Both read
CLOCK_MONOTONIC, which processes on one Linux machine share, so a hop's round trip splits into client send,
transport up, server before compute, compute, server after compute, transport down. ``message_costs`` times the
corolla code on that path in-process, without any network.
"""

from __future__ import annotations

import time
from bisect import bisect_left, bisect_right

import torch

from bench.common import run_on_peer_loop
from bench.workload import median


class ClientProbe:
    """Timestamps in this (the client's) process, by wrapping a few corolla methods; nothing in corolla changes."""

    def __init__(self):
        from corolla.client.inference_session import InferenceSession
        from corolla.client.model import DistributedModelForCausalLM
        from corolla.client.sequence_manager import RemoteSequenceManager
        from corolla.swarm.transport import Connection

        self.rec: dict[str, list] = {}
        self._patched: list[tuple[type, str, object]] = []
        self._patch_async(InferenceSession, "_hop_step", "hop", lambda s, hop, message, *a: (
            hop.hop.peer_id, hop.hop.start, hop.hop.end, message.hidden.shape[1]))  # fmt: skip
        self._patch_async(InferenceSession, "_step", "chain")
        self._patch_async(
            InferenceSession, "_open_chain", "open_chain", lambda s, start, end, history: history is not None
        )
        self._patch_async(InferenceSession, "_open_hop", "open_hop")
        self._patch_async(InferenceSession, "_replay", "replay", lambda s, session, x: x.shape[1])
        self._patch_async(RemoteSequenceManager, "make_route", "make_route")
        self._patch_async(Connection, "send", "send", lambda conn, *a: conn.peer_id)
        self._patch_async(Connection, "recv", "recv", lambda conn, *a: conn.peer_id)
        self._patch_sync(InferenceSession, "step", "session_step")
        self._patch_sync(DistributedModelForCausalLM, "forward", "forward")

    def _add(self, key, value) -> None:
        self.rec.setdefault(key, []).append(value)

    def _patch_async(self, cls, name, key, info=lambda *a: None) -> None:
        """Record (begin, end, info(args)) under ``key``, or under ``key + "_failed"`` when it raises."""
        original, clock, add = getattr(cls, name), time.perf_counter, self._add

        async def wrapper(*args, **kwargs):
            t0 = clock()
            try:
                result = await original(*args, **kwargs)
            except BaseException:
                add(key + "_failed", (t0, clock(), info(*args)))
                raise
            add(key, (t0, clock(), info(*args)))
            return result

        self._patched.append((cls, name, original))
        setattr(cls, name, wrapper)

    def _patch_sync(self, cls, name, key) -> None:
        original, clock, add = getattr(cls, name), time.perf_counter, self._add

        def wrapper(*args, **kwargs):
            t0 = clock()
            result = original(*args, **kwargs)
            add(key, (t0, clock()))
            return result

        self._patched.append((cls, name, original))
        setattr(cls, name, wrapper)

    def clear(self) -> None:
        self.rec.clear()

    def restore(self) -> None:
        for cls, name, original in reversed(self._patched):
            setattr(cls, name, original)
        self._patched.clear()

    def get(self, key, windows=None) -> list:
        items = self.rec.get(key, [])
        if windows is None:
            return items
        return [it for it in items if any(a <= it[0] <= b for a, b in windows)]


def client_breakdown(probe: ClientProbe, windows) -> dict:
    """Per generated token, where the client's time goes (ms, medians over the one-token steps)."""
    fwd = probe.get("forward", windows)
    steps, chains = probe.get("session_step"), probe.get("chain")
    rows = []
    for (fb, fe), (nb, _) in zip(fwd, fwd[1:]):
        if nb - fe > 0.5:
            continue  # the next forward belongs to another generate call
        s = [x for x in steps if fb <= x[0] <= fe]
        c = [x for x in chains if fb <= x[0] <= fe]
        if len(s) != 1 or len(c) != 1:
            continue
        (sb, se), (cb, ce, _) = s[0], c[0]
        rows.append({
            "before_chain (prepare_step, embedding)": sb - fb,
            "bridge_to_network_thread": cb - sb,
            "chain (all hops)": ce - cb,
            "bridge_back": se - ce,
            "after_chain (norm, lm_head)": fe - se,
            "generate_loop (transformers, between forwards)": nb - fe,
        })  # fmt: skip
    rows = rows[1:]  # the prefill forward
    if not rows:
        return {}
    return {k: 1000 * median([r[k] for r in rows]) for k in rows[0]}


def _server_split(send, recv, srv: dict) -> dict:
    """One hop's round trip between the client's send and recv, split by the server's stamps (s); {} if the
    server's records don't bracket it."""
    read = srv["read_done"]
    i = bisect_right(read, send[1])
    if i >= len(read) or read[i] > recv[1]:
        return {}
    j = bisect_left(srv["begin"], read[i])
    k = bisect_left(srv["write_end"], read[i])
    if j >= len(srv["begin"]) or k >= len(srv["write_end"]) or srv["write_end"][k] > recv[1]:
        return {}
    begin, end, write_end = srv["begin"][j], srv["end"][j], srv["write_end"][k]
    return {
        "client_encode_send": send[1] - send[0],
        "transport_up (p2pd x2, server read+decode)": read[i] - send[1],
        "server_before_compute (checks, hand-off to compute thread)": begin - read[i],
        "server_compute": end - begin,
        "server_after_compute (hand-off back, encode, write)": write_end - end,
        "transport_down (p2pd x2, client read+decode)": recv[1] - write_end,
    }


def _hop_stats(items: list[dict], bench_compute_ms: float | None) -> dict:
    keys = dict.fromkeys(k for r in items for k in r)  # in path order, the same in every run
    stats = {k: 1000 * median([r.get(k) for r in items]) for k in keys}
    result = {"round_trip_ms": stats.pop("round_trip"), "steps": len(items)}
    compute = stats.get("server_compute")
    result["server_compute_ms"] = compute
    result["bench_process_compute_ms"] = bench_compute_ms
    reference = compute if compute is not None else bench_compute_ms
    result["overhead_ms"] = result["round_trip_ms"] - reference
    result["breakdown_ms"] = {k: v for k, v in stats.items() if k != "server_compute"}
    return result


def hop_breakdown(
    probe: ClientProbe, windows, server_records: dict, span_of: dict, bench_compute_ms: dict
) -> dict:
    """Per hop (by span), a one-token step's round trip split by client and server timestamps (ms, medians).

    With push (the client's default) only the first hop is sent by the client; a later hop's "round trip" runs
    from the client's wait for it (after the previous hop's result) to its result, and has no client-side split.
    """
    sends, recvs = probe.get("send", windows), probe.get("recv", windows)
    rows: dict[str, list[dict]] = {}
    for t0, t1, (peer, start, end, tokens) in probe.get("hop", windows):
        if tokens != 1:
            continue
        row = {"round_trip": t1 - t0}
        send = next((s for s in sends if s[2] == peer and t0 <= s[0] <= t1), None)
        recv = next((r for r in recvs if r[2] == peer and t0 <= r[1] <= t1), None)
        srv = server_records.get(peer)
        if send and recv and srv:
            row.update(_server_split(send, recv, srv))
        rows.setdefault(span_of.get(peer, f"{start}:{end}"), []).append(row)
    return {span: _hop_stats(items, bench_compute_ms.get(span)) for span, items in rows.items()}


def _timed_us(fn, n: int = 1000) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * median(times)


def _codec_costs(hidden: int) -> dict:
    from corolla.wire.codec import unpack
    from corolla.wire.framing import HEADER, encode_frame
    from corolla.wire.messages import MESSAGE_CLASSES, InferenceStep, InferenceStepResult, Kind

    x = torch.randn(1, 1, hidden)
    step = InferenceStep(20, x, torch.tensor([[20]]), torch.ones(1, 1, dtype=torch.bool))
    frame = encode_frame(step)
    cls = MESSAGE_CLASSES[Kind(HEADER.unpack(frame[: HEADER.size])[2])]
    result = InferenceStepResult(x)
    return {
        "encode InferenceStep": _timed_us(lambda: encode_frame(step)),
        "decode InferenceStep": _timed_us(lambda: unpack(cls, frame[HEADER.size :], max_tensor_bytes=1 << 26)),
        "encode InferenceStepResult": _timed_us(lambda: encode_frame(result)),
    }


async def _worker_and_wait_for() -> tuple[float, float]:
    import asyncio

    from corolla.server.compute import PRIORITY_INFERENCE, ComputeWorker

    worker = ComputeWorker()
    try:
        hand_off, wait_for = [], []
        for _ in range(500):
            t0 = time.perf_counter()
            await worker.submit(PRIORITY_INFERENCE, lambda: None)
            hand_off.append(time.perf_counter() - t0)
        for _ in range(500):
            t0 = time.perf_counter()
            await asyncio.wait_for(asyncio.sleep(0), 180)
            wait_for.append(time.perf_counter() - t0)
        return 1e6 * median(hand_off), 1e6 * median(wait_for)
    finally:
        worker.shutdown()


def message_costs(hidden_sizes) -> dict:
    """In-process cost (µs, medians) of the corolla code on each hop's path, without any network."""
    out = {f"hidden {hidden}": _codec_costs(hidden) for hidden in sorted(set(hidden_sizes))}
    hand_off, wait_for = run_on_peer_loop(_worker_and_wait_for())
    out["ComputeWorker.submit round trip (no-op job: thread hand-off there and back)"] = hand_off
    out["asyncio.wait_for around a step (per step in handlers._steps)"] = wait_for
    return out
