"""Turning ``bench.generate``'s measurements into its verdict: checks against the targets, the step-time fit
over hop counts, short findings stated from this run's numbers, the notes on method, and the JSON text."""

from __future__ import annotations

import json
import re
import statistics

from bench.workload import HOP_OVERHEAD_TARGET_MS, TARGETS


def checks(name: str, result: dict) -> dict:
    """One model's targets (speed vs local, per-hop overhead) and token-exact outputs."""
    out = {}
    for key in ("2", "3"):
        if key not in result["swarms"]:
            continue
        ratio = result["swarms"][key]["ratio_vs_paired_local"]
        out[f"swarm_{key}_servers tokens_per_s / local tokens_per_s"] = {
            "measured": ratio, "target_min": TARGETS[name], "pass": ratio >= TARGETS[name],
        }  # fmt: skip
    for key, sw in result["swarms"].items():
        out[f"swarm_{key} per-hop overhead ms"] = {
            "measured": sw["per_hop_overhead_ms"], "target_max": HOP_OVERHEAD_TARGET_MS,
            "pass": sw["per_hop_overhead_ms"] <= HOP_OVERHEAD_TARGET_MS,
        }  # fmt: skip
    for key, sw in result["swarms"].items():
        out[f"swarm_{key} greedy output == local transformers (token-exact)"] = sw["token_exact_vs_local"]
    if "failover" in result:
        failover = result["failover"]
        out["failover greedy output == local transformers (token-exact)"] = failover["token_exact_vs_local"]
    local_chain = result["local_chain_no_network"]
    out["local_chain (no network) output == local transformers"] = local_chain["token_exact_vs_local"]
    return out


def step_fit(result: dict, threads: int) -> dict:
    """Median step by hop count (servers with ``threads`` threads) and the least-squares ms per extra hop."""
    step_by_hops = {sw["hops"]: sw["step_ms_median"] for sw in result["swarms"].values()
                    if sw["server_threads"] == threads}  # fmt: skip
    if "failover" in result:
        before = result["failover"]["before_failure (the chosen route, no fault)"]
        if before["hops"] not in step_by_hops:
            step_by_hops[before["hops"]] = before["step_ms_median"]
    if len(step_by_hops) < 2:
        return {}
    xs, ys = zip(*sorted(step_by_hops.items()))
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {
        "step_ms_by_hops": {str(x): y for x, y in zip(xs, ys)},
        "step_ms_per_extra_hop (fit; same total compute)": slope,
    }


def _mean_known(values) -> float:
    """The mean of the values that were measured (pushed hops have no client-side split), NaN if none were."""
    known = [v for v in values if v is not None]
    return statistics.mean(known) if known else float("nan")


def _swarm_findings(name: str, key: str, sw: dict) -> list[str]:
    hops = list(sw["per_hop"].values())
    if not hops or not hops[0]["breakdown_ms"]:
        return []

    def avg(prefix):  # hops whose input was pushed by the previous server have no client-side send to split
        values = [v for h in hops for k, v in h["breakdown_ms"].items() if k.startswith(prefix) and v is not None]
        return statistics.mean(values) if values else float("nan")

    client = sw["client_breakdown_ms"]
    head = next(v for k, v in client.items() if k.startswith("after_chain"))
    rest = sum(v for k, v in client.items() if not k.startswith(("after_chain", "chain")))
    lines = [
        f"{name} swarm_{key}: {sw['steady_tokens_per_s']:.1f} tok/s = {sw['ratio_vs_paired_local']:.2f}x local "
        f"({sw['paired_local_steady_tokens_per_s']:.1f} tok/s); step {sw['step_ms_median']:.2f} ms = "
        f"{len(hops)} hop(s) of {statistics.mean(h['round_trip_ms'] for h in hops):.2f} ms "
        f"(server compute {_mean_known(h['server_compute_ms'] for h in hops):.2f} ms) + client norm/lm_head "
        f"{head:.2f} ms + client generate loop/embedding/bridge {rest:.2f} ms. Per-hop overhead "
        f"{sw['per_hop_overhead_ms']:.2f} ms = transport up+down {avg('transport_up') + avg('transport_down'):.2f} "
        f"+ server outside compute {avg('server_before') + avg('server_after'):.2f} + client send "
        f"{avg('client_encode'):.2f} ms."
    ]
    bound = sw.get("max_ratio_vs_local_if_all_overhead_were_zero")
    if bound is not None and key in ("2", "3"):
        target = TARGETS[name]
        lines.append(
            f"{name} swarm_{key}: with zero overhead a step would still take the servers' compute + client head "
            f"= {sw[next(k for k in sw if k.startswith('step_floor_ms'))]:.2f} ms, i.e. at most {bound:.2f}x "
            f"local: the {target}x target is {'reachable' if bound >= target else 'unreachable'} by cutting "
            "overhead alone."
        )
    return lines


def _failover_finding(name: str, fo: dict) -> str:
    b = fo["pause_breakdown_ms"]
    eof = b.get("failed_hop_attempt (until the dead server's EOF)")
    replay = b.get("  replay (tokens, ms)", [])
    return (
        f"{name} failover: pause {fo['pause_ms']:.0f} ms vs {fo['typical_step_ms']:.1f} ms typical step; "
        f"EOF from the dead hop after {eof or 0:.0f} ms (its p2pd was gone {fo.get('victim_p2pd_gone_after_kill_ms') or 0:.0f} ms "
        f"after the kill), new chain {b.get('replace_chain total', 0):.0f} ms of which replay "
        f"{' + '.join(f'{ms:.0f}' for _, ms in replay)} ms ({replay[0][0] if replay else 0} tokens, hop after hop); "
        f"output {'identical' if fo['token_exact_vs_local'] else 'DIFFERENT'}."
    )


def findings(out: dict) -> list[str]:
    """Short factual statements derived from this run's numbers."""
    lines = []
    floor = out.get("transport_floor (bare echo to another process)", {})
    for key, value in floor.items():
        if "streamed" in key:
            lines.append(
                f"transport ({key}): hivemind stream via two p2pd daemons {value['hivemind_p2pd_stream_rtt_ms']:.2f} ms "
                f"round trip vs direct TCP {value['direct_tcp_rtt_ms']:.2f} ms."
            )
    for name, m in out["models"].items():
        for key, sw in m["swarms"].items():
            lines.extend(_swarm_findings(name, key, sw))
        if m.get("failover"):
            lines.append(_failover_finding(name, m["failover"]))
    return lines


def dumps(obj) -> str:
    """Indented JSON with lists of scalars kept on one line."""
    text = json.dumps(obj, indent=2)
    scalar_list = re.compile(
        r"\[\s*((?:-?[\d.eE+-]+|true|false|null|\"[^\"\n]*\")(?:,\s*(?:-?[\d.eE+-]+|true|false|null|\"[^\"\n]*\"))*)\s*\]"
    )
    return scalar_list.sub(lambda m: json.dumps(json.loads(m.group(0))), text)


def rounded(x):
    """Floats to 3 decimals, through dicts, lists and tuples."""
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v) for v in x]
    return x


NOTES = [
    "fp32, greedy, batch 1, a prompt of 16 random token ids. steady tokens/s = (new_tokens - 1) / (first to last "
    "streamed token); ttft = generate() call to first streamed token; medians over runs.",
    "Ratios: each swarm run is paired with a local transformers run just before it (same process, the chosen "
    "local thread count); ratio = median over pairs of swarm/local steady tokens/s. Other sessions share this "
    "2-core machine: others_cpu_cores_* is the CPU others used during each run (psutil, all processes minus this "
    "one and its children); before each pair the bench waits (bounded) for them to use < 0.3 cores.",
    "Threads: every server runs --num_threads 1 with OMP_NUM_THREADS=1 (MKL too); the client process 1 torch "
    "thread during swarm runs. In a batch-1 chain one process computes at a time; on 2 cores an OpenMP pool that "
    "spins while idle steals the core another process needs. Unless --quick the 2-hop swarm is also run with 2 "
    "threads per server (swarms['2_threads2']); the 3-hop and failover swarms use 1 thread. At batch 1 a step is "
    "bound by memory bandwidth, not by cores: 2 threads per server gave no consistent gain over 1 in repeated runs "
    "(within the run-to-run spread of about 5%), and local transformers gains nothing from 2 threads either. "
    "local_transformers is measured with 1 and 2 threads; the faster is the reference.",
    "Per hop: round trip = InferenceSession._hop_step as timed in the client; server timestamps come from "
    "`python -m bench.common probe_server` (corolla's run_server main plus perf_counter stamps: message read+decoded, "
    "compute thread begin/end, reply written). CLOCK_MONOTONIC is shared by processes, so the round trip splits "
    "into client send, transport up, server before compute, server compute, server after compute, transport down. "
    "overhead_ms = round trip - the server's own compute of the step. bench_process_compute_ms is the same "
    "blocks' compute measured here with BlockStack for comparison. client_breakdown_ms splits a token's time in "
    "the client (transformers generate loop, embedding, bridge to the network thread, chain, norm + lm_head).",
    "Event loops: the transport floor's echo and client, and the asyncio.wait_for cost in corolla_message_costs_us, "
    "run on corolla.swarm.loop.new_event_loop (uvloop when installed), the loop corolla's peers use.",
    "max_ratio_vs_local_if_all_overhead_were_zero = the fastest local step seen (reference or paired runs) / "
    "(the servers' own compute + the client head): with batch 1 each token waits for the previous one, so servers "
    "and client never compute at once and a swarm step can't be shorter than that. bench_process_compute_ms runs "
    "one span at a time in a hot loop: spans under the 32 MiB L3 stay cached there, so for tiny it is well below "
    "the servers' own compute (their weights are evicted by the client's 31 MiB lm_head and the other servers "
    "between steps); overheads are computed against the servers' own compute.",
    "local_chain_no_network: corolla's client model (transformers generate with use_cache=False + BlockStack) on "
    "an in-process LocalChain, 1 thread: the swarm with a free network.",
    "Server memory: psutil RSS of each server process (python + torch + hivemind + its blocks) once online and "
    "after the runs; its p2pd (+ reaper) apart; rss_file_backed_mb is the file-backed part (RssFile + RssShmem): "
    "shared libraries (about 120 MB for torch & co.) plus any checkpoint pages still mapped: since corolla d3a077e "
    "Checkpoint.load_tensors copies tensors out of safetensors' mmap, so none remain (the key keeps its name). "
    "The bootstrap DHT peer's RSS is python + hivemind for scale.",
    "Failover: servers [0:N), [0:N/2), [N/2:N); the client's planner picks the route (usually the full server: 1 "
    "hop; 'before_failure' measures that route without a fault); the first server of the route is SIGKILLed when "
    "the streamer gets token new_tokens/2; pause_ms is the longest gap between streamed tokens of that run, "
    "pause_breakdown_ms what the client did in it. The dead hop answers EOF only once its p2pd is gone "
    "(victim_p2pd_gone_after_kill_ms); the reaper that kills p2pd sees its pipe close only after the kernel has "
    "torn down the dead server's memory, so this grows with the server's RSS.",
]
