"""A server SIGKILLed in the middle of a generation: how long the client pauses, and what it does in the pause.

Servers [0:N), [0:N/2), [N/2:N); the client's planner picks the route (usually the full server: 1 hop), which is
first timed without a fault. Then the route's first server is SIGKILLed when the streamer gets token
new_tokens/2; the longest gap between streamed tokens is the pause. The dead hop answers EOF only once the
server's p2pd is gone, so the time from the kill until then is measured apart.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time

from bench.common import log
from bench.hop_timing import ClientProbe, client_breakdown
from bench.swarm_runs import SwarmBench, span_names
from bench.workload import median


def helper_processes(pid: int) -> list:
    import psutil

    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.name() == "p2pd"]
    except psutil.Error:
        return []


def watch_exit(processes, into: dict) -> None:
    """In a thread: ms from the kill until the killed server's p2pd is gone (the reaper kills it)."""
    import psutil

    def run():
        start = into["at"]
        while time.perf_counter() - start < 10:
            alive = []
            for p in processes:
                try:
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(p)
                except psutil.Error:
                    pass
            if not alive:
                into["p2pd_gone_ms"] = 1000 * (time.perf_counter() - start)
                return
            time.sleep(0.0005)

    threading.Thread(target=run, daemon=True).start()


def route_names(chain, by_peer) -> list[str]:
    return [f"{by_peer[h.peer_id].name}[{h.start}:{h.end})" for h in chain.route]


def pause_breakdown(probe: ClientProbe, killed_at: float | None, pause_ms: float) -> dict:
    """What the client did between the kill and the next token: the failed hop, re-planning, opening, replay."""
    if killed_at is None:
        return {}
    after = lambda key: [x for x in probe.rec.get(key, []) if x[0] >= killed_at]  # noqa: E731
    out = {}
    failed = after("hop_failed")
    if failed:
        out["failed_hop_attempt (until the dead server's EOF)"] = 1000 * (failed[0][1] - failed[0][0])
    reopen = [x for x in after("open_chain") if x[2]]
    if reopen:
        t0, t1, _ = reopen[0]
        out["replace_chain total"] = 1000 * (t1 - t0)
        within = lambda key: [x for x in probe.rec.get(key, []) if t0 <= x[0] <= t1]  # noqa: E731
        out["  make_route"] = 1000 * sum(x[1] - x[0] for x in within("make_route"))
        out["  open_hop (stream + InferenceOpen)"] = [round(1000 * (x[1] - x[0]), 2) for x in within("open_hop")]
        out["  replay (tokens, ms)"] = [(x[2], round(1000 * (x[1] - x[0]), 2)) for x in within("replay")]
        hops = [x for x in probe.rec.get("hop", []) if x[0] >= t1][:2]
        out["the step on the new chain (hops, ms)"] = [round(1000 * (x[1] - x[0]), 2) for x in hops]
    accounted = out.get("failed_hop_attempt (until the dead server's EOF)", 0) + out.get("replace_chain total", 0)
    out["rest (kill, lm_head, generate loop, scheduling)"] = (
        pause_ms - accounted - sum(out.get("the step on the new chain (hops, ms)", []))
    )
    return out


def _before_failure(bench: SwarmBench, model, probe: ClientProbe, procs, names: list[str]) -> dict:
    """The route the planner chose, timed without a fault, like a swarm run."""
    by_peer = {p.peer_id: p for p in procs}
    before, windows = bench.paired_runs(model)
    before["per_hop"] = bench.per_hop(probe, windows, procs, names)
    route = []
    for _, _, (peer, start, end, _) in probe.get("hop", windows):
        if (peer, start, end) not in route:
            route.append((peer, start, end))
    before["route"] = [f"{by_peer[peer].name}[{start}:{end})" for peer, start, end in route]
    before["hops"] = len(before["per_hop"])
    before["per_hop_overhead_ms"] = statistics.mean(h["overhead_ms"] for h in before["per_hop"].values())
    before["client_breakdown_ms"] = client_breakdown(probe, windows)
    before.update(bench.floor(before, before["per_hop"]))
    return before


def _faulted_generation(bench: SwarmBench, model, probe: ClientProbe, procs, kill_at: int) -> tuple[dict, dict]:
    """One generation whose route's first server is SIGKILLed when the streamer gets token ``kill_at``."""
    by_peer, killed = {p.peer_id: p for p in procs}, {}
    bench.work.wait_quiet()
    probe.clear()
    with model.inference_session(max_length=bench.work.max_length) as session:
        chain = session.chain_session

        def on_token(count):
            if count == kill_at:
                victim = by_peer[chain.route[0].peer_id]
                killed.update(name=victim.name, route_before=route_names(chain, by_peer))
                helpers = helper_processes(victim.pid)
                os.kill(victim.pid, signal.SIGKILL)  # the server process only; its reaper ends its p2pd
                killed["at"] = time.perf_counter()
                watch_exit(helpers, killed)

        run = bench.work.generate(model, session=session, on_token=on_token)
        run.update(route_after=route_names(chain, by_peer), failovers=chain.failovers)
    return run, killed


def failover_run(bench: SwarmBench, prefix: str, threads: int) -> dict:
    n, half = bench.work.num_blocks, bench.work.num_blocks // 2
    spans = [(0, n), (0, half), (half, n)]
    names = span_names(spans)
    procs = bench.start_servers(prefix, spans, threads, [f"{prefix}-full", f"{prefix}-left", f"{prefix}-right"])
    probe, model = ClientProbe(), None
    try:
        model = bench.connect(prefix)
        before = _before_failure(bench, model, probe, procs, names)
        kill_at = bench.work.new_tokens // 2
        run, killed = _faulted_generation(bench, model, probe, procs, kill_at)
        gaps = run["step_gaps_s"]
        worst = max(range(len(gaps)), key=gaps.__getitem__)
        result = {
            "servers": dict(zip([p.name for p in procs], names)),
            "before_failure (the chosen route, no fault)": before,
            "killed": killed.get("name"),
            "killed_after_token": kill_at,
            "route_before": killed.get("route_before"),
            "route_after": run["route_after"],
            "failovers": run["failovers"],
            "pause_ms": 1000 * gaps[worst],
            "pause_after_token": worst + 1,
            "typical_step_ms": 1000 * median([g for i, g in enumerate(gaps) if i != worst]),
            "pause_breakdown_ms": pause_breakdown(probe, killed.get("at"), 1000 * gaps[worst]),
            "victim_p2pd_gone_after_kill_ms": killed.get("p2pd_gone_ms"),
            "others_cpu_cores": round(run["foreign_cores"], 2),
            "token_exact_vs_local": run["tokens"] == bench.refs.tokens,
        }
        log(f"  failover: pause {result['pause_ms']:.0f} ms (typical step {result['typical_step_ms']:.1f} ms), "
            f"{result['route_before']} -> {result['route_after']}, exact={result['token_exact_vs_local']}")  # fmt: skip
        return result
    finally:
        bench.close(procs, model, probe)
