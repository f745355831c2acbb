"""Swarms of one model: starting servers, connecting a client, and timing its runs against local transformers.

Each swarm run is paired with a local transformers run just before it (local, swarm, local, swarm, ...), so that
both see the same load from others; the ratio is the median over pairs. While the swarm runs, ``ClientProbe``
and the servers' probes take timestamps for the per-hop and client breakdowns (``bench.hop_timing``).
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.common import ProcessGroups, Swarm, children_rss, log, rss_bytes, rss_file_bytes
from bench.hop_timing import ClientProbe, client_breakdown, hop_breakdown
from bench.workload import References, Workload, median, summarize_runs, warm_up


def mem_info(procs, spans, block_param_bytes: dict[str, int]) -> dict:
    out = {}
    for proc, span in zip(procs, spans):
        rss = rss_bytes(proc.pid)
        out[proc.name] = {
            "blocks": span,
            "rss_mb": rss / 2**20,
            "blocks_param_mb": block_param_bytes[span] / 2**20,
            "rss_minus_blocks_mb": (rss - block_param_bytes[span]) / 2**20,
            "rss_file_backed_mb (mmapped checkpoint pages)": rss_file_bytes(proc.pid) / 2**20,
            "helpers_rss_mb (p2pd, reaper)": children_rss(proc.pid) / 2**20,
        }
    return out


def span_names(spans: list[tuple[int, int]]) -> list[str]:
    return [f"{a}:{b}" for a, b in spans]


class SwarmBench:
    """One model's swarms: what every swarm run shares (workload, references, the bootstrap peer, processes)."""

    def __init__(self, work: Workload, refs: References, swarm: Swarm, groups: ProcessGroups, probe_servers: bool):
        self.work, self.refs, self.swarm, self.groups = work, refs, swarm, groups
        self.probe_servers = probe_servers

    def start_servers(self, prefix: str, spans, threads: int, names=None) -> list:
        names = names or [f"{prefix}-s{i}" for i in range(len(spans))]
        procs = [
            self.swarm.start_server(n, self.work.ckpt, f"{a}:{b}", prefix, threads, probe=self.probe_servers)
            for n, (a, b) in zip(names, spans)
        ]
        t0 = time.perf_counter()
        self.swarm.wait_online(procs, prefix, self.work.num_blocks)
        log(f"  {len(procs)} servers online in {time.perf_counter() - t0:.1f} s ({prefix})")
        return procs

    def connect(self, prefix: str):
        from corolla import AutoDistributedModelForCausalLM

        return AutoDistributedModelForCausalLM.from_pretrained(
            str(self.work.ckpt), initial_peers=self.swarm.initial_peers, dht_prefix=prefix
        )

    def close(self, procs, model, probe: ClientProbe) -> None:
        probe.restore()
        if model is not None:
            model.shutdown()
        self.groups.kill_many(procs)

    def server_records(self, procs) -> dict:
        out = {}
        for proc in procs:
            if proc.poll() is None:
                records = self.swarm.probe_records(proc)
                if records:
                    out[proc.peer_id] = records
        return out

    def paired_runs(self, model) -> tuple[dict, list]:
        """The swarm's runs, each right after a local run; returns the summary and the swarm runs' windows."""
        work, refs = self.work, self.refs
        warm_up(model, work.ids)
        torch.set_num_threads(refs.local_threads)
        warm_up(refs.local_model, work.ids)
        local_runs, swarm_runs = [], []
        for _ in range(work.runs):
            work.wait_quiet()
            torch.set_num_threads(refs.local_threads)
            local_runs.append(work.generate(refs.local_model))
            torch.set_num_threads(1)
            swarm_runs.append(work.generate(model))
        result = summarize_runs(swarm_runs)
        local = summarize_runs(local_runs)
        ratios = [s["steady_tokens_per_s"] / loc["steady_tokens_per_s"] for s, loc in zip(swarm_runs, local_runs)]
        result["paired_local_steady_tokens_per_s"] = local["steady_tokens_per_s"]
        result["paired_local_others_cpu_cores"] = local["others_cpu_cores_during_runs"]
        result["ratio_vs_paired_local"] = median(ratios)
        result["ratio_vs_paired_local_runs"] = [round(r, 3) for r in ratios]
        result["token_exact_vs_local"] = all(r["tokens"] == refs.tokens for r in swarm_runs)
        return result, [r["window"] for r in swarm_runs]

    def per_hop(self, probe: ClientProbe, windows, procs, names: list[str]) -> dict:
        span_of = {p.peer_id: s for p, s in zip(procs, names)}
        return hop_breakdown(probe, windows, self.server_records(procs), span_of, self.refs.compute_ms)

    def floor(self, result: dict, hops: dict) -> dict:
        """The shortest step this chain could take: servers' compute + client head, nothing else."""
        compute = [h["server_compute_ms"] for h in hops.values()]
        if any(c is None for c in compute):
            return {}
        floor = sum(compute) + self.refs.head_ms
        # the fastest local step seen (quiet reference or the paired runs): a conservative bound
        local_step = 1000 / max(result["paired_local_steady_tokens_per_s"], self.refs.local_tps)
        return {
            "step_floor_ms (servers' compute + client head)": floor,
            "max_ratio_vs_local_if_all_overhead_were_zero": local_step / floor,
        }

    def swarm_run(self, prefix: str, spans, threads: int) -> dict:
        """A chain of servers with disjoint ``spans``: paired runs, per-hop and client breakdowns, memory."""
        names = span_names(spans)
        procs = self.start_servers(prefix, spans, threads)
        probe, model = ClientProbe(), None
        try:
            memory = mem_info(procs, names, self.refs.param_bytes)
            model = self.connect(prefix)
            result, windows = self.paired_runs(model)
            for proc in procs:
                memory[proc.name]["rss_after_generating_mb"] = rss_bytes(proc.pid) / 2**20
            hops = self.per_hop(probe, windows, procs, names)
            result.update(
                server_threads=threads,
                hops=len(spans),
                route=names,
                per_hop=hops,
                per_hop_overhead_ms=statistics.mean(h["overhead_ms"] for h in hops.values()),
                client_breakdown_ms=client_breakdown(probe, windows),
                **self.floor(result, hops),
                server_memory=memory,
            )
            log(f"  swarm {prefix}: {result['steady_tokens_per_s']:.1f} tok/s ({result['ratio_vs_paired_local']:.2f}x "
                f"local), ttft {result['ttft_ms']:.0f} ms, per-hop overhead {result['per_hop_overhead_ms']:.2f} ms, "
                f"exact={result['token_exact_vs_local']}")  # fmt: skip
            return result
        finally:
            self.close(procs, model, probe)
