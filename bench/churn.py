"""A swarm under churn: generations through servers that die and are replaced, re-covering lost blocks,
and rebalancing. Prints JSON on stdout; progress on stderr.

    python -m bench.churn [--generations 30] [--kills 4] [--workdir DIR]

Three phases on a tiny random Llama (8 blocks), all servers started with only ``--num_blocks 4``:

1. **churn**: 4 servers place themselves; a client runs greedy generations (10 new tokens each) while
   another thread SIGKILLs or SIGTERMs a server (mostly one on the current route) and starts a fresh one,
   which joins where the swarm is weakest. Every generation is compared with local transformers. The
   failover pause of a generation is its longest gap between tokens minus the median gap of undisturbed
   generations.
2. **re-cover**: both servers of one half are SIGKILLed; the time until every block is served again (by a
   server of the other half that moves) is measured: record expiry + a rebalancing check + loading.
3. **rebalance**: servers announcing 100, 100 and 300 tokens/s (``--throughput``) join one after another:
   the first two take one half each, the fast one joins the left half (equal weakness, leftmost), leaving
   the right half at 100. The bench reports the swarm's bottleneck (slowest block's total throughput) then,
   and after the slow left server moves right (100 -> 200).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.common import ProcessGroups, Swarm, log, write_llama

BLOCKS = 8
PREFIX = "churn-llama"
AUTO = ("--num_blocks", "4", "--balance_period", "1", "--update_period", "1")


class Watch:
    """Reads the DHT: online servers per block, and the swarm's bottleneck throughput."""

    def __init__(self, swarm: Swarm):
        self.swarm = swarm

    def records(self):

        bridge, node = self.swarm._watch()
        return bridge.run(node.records.block_infos(PREFIX, BLOCKS))

    def coverage(self) -> list[dict]:
        from corolla.wire.records import ServerState

        return [
            {p: i for p, i in servers.items() if i.state == ServerState.ONLINE and i.start <= b < i.end}
            for b, servers in enumerate(self.records())
        ]

    def bottleneck(self) -> float:
        return min(sum(i.throughput for i in servers.values()) for servers in self.coverage())

    def wait(self, predicate, timeout: float, what: str) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if predicate():
                return time.monotonic() - t0
            time.sleep(0.1)
        raise TimeoutError(f"{what} not reached in {timeout} s")


def start_auto(swarm: Swarm, ckpt: Path, name: str, *extra: str):
    proc = swarm.start_server(name, ckpt, None, PREFIX, extra=(*AUTO, *extra))
    swarm.wait_online([proc], PREFIX, BLOCKS)
    return proc


class Tokens:
    """A generate streamer: token arrival times, and the route the session is on."""

    def __init__(self, session, current: dict):
        self.session, self.current, self.times = session, current, []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        self.current["route"] = {hop.peer_id for hop in self.session.chain_session.route}

    def end(self) -> None:
        pass


def churn_phase(groups, ckpt: Path, generations: int, kills: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from corolla import AutoDistributedModelForCausalLM

    swarm = Swarm(groups)
    swarm.start_dht()
    servers = {}
    for i in range(4):
        servers[f"s{i}"] = start_auto(swarm, ckpt, f"s{i}")
    log("churn: 4 servers placed themselves")
    reference = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    prompts = [torch.randint(3, 320, (1, 6), generator=torch.Generator().manual_seed(i)) for i in range(40)]
    expected = [reference.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=10, do_sample=False)
                for p in prompts]  # fmt: skip
    model = AutoDistributedModelForCausalLM.from_pretrained(
        ckpt, initial_peers=swarm.initial_peers, dht_prefix=PREFIX, step_timeout_floor=0.3, ping_timeout=0.7,
        update_period=1.0,
    )  # fmt: skip
    rng, stop, events, current = random.Random(7), threading.Event(), [], {}

    def churn():
        n = 0
        while not stop.is_set() and n < kills:
            time.sleep(rng.uniform(0.5, 1.5))
            in_route = [k for k, p in servers.items() if p.peer_id in current.get("route", ())]
            name = rng.choice(in_route if in_route and rng.random() < 0.75 else sorted(servers))
            proc = servers.pop(name)
            sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
            os.killpg(proc.pid, sig)
            proc.wait(60)
            n += 1
            events.append(f"{sig.name} {name}")
            log(f"churn: {sig.name} {name}; starting r{n}")
            servers[f"r{n}"] = start_auto(swarm, ckpt, f"r{n}")

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    attempted, completed, exact, rows = 0, 0, 0, []
    try:
        while (attempted < generations or thread.is_alive()) and attempted < 2000:
            ids = prompts[attempted % len(prompts)]
            attempted += 1
            try:
                with model.inference_session(max_length=32) as session:
                    tokens = Tokens(session, current)
                    got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                         do_sample=False, session=session, streamer=tokens)  # fmt: skip
                    failovers = session.chain_session.failovers
            except Exception as e:
                log(f"churn: generation {attempted} failed: {e!r}")
                continue
            completed += 1
            exact += bool(torch.equal(got, expected[(attempted - 1) % len(prompts)]))
            gaps = [b - a for a, b in zip(tokens.times[1:], tokens.times[2:])]  # after the prompt's step
            rows.append((failovers, max(gaps) if gaps else 0.0, gaps))
    finally:
        stop.set()
        thread.join(300)
        model.shutdown()
        swarm.close()
        groups.kill_all()
    calm = [g for f, _, gaps in rows if f == 0 for g in gaps]
    typical = statistics.median(calm) if calm else 0.0
    pauses = [max(0.0, worst - typical) for f, worst, _ in rows if f > 0]
    return {
        "generations_attempted": attempted,
        "generations_completed": completed,
        "generations_token_exact": exact,
        "kills": events,
        "generations_with_failover": len(pauses),
        "typical_token_gap_ms": round(typical * 1000, 2),
        "failover_pause_mean_ms": round(statistics.mean(pauses) * 1000, 1) if pauses else None,
        "failover_pause_worst_ms": round(max(pauses) * 1000, 1) if pauses else None,
    }


def recover_phase(groups, ckpt: Path) -> dict:
    swarm = Swarm(groups)
    swarm.start_dht()
    watch = Watch(swarm)
    try:
        servers = [start_auto(swarm, ckpt, f"s{i}") for i in range(4)]
        spans = {p.peer_id: p for p in servers}
        coverage = watch.coverage()
        right = {p for p in coverage[BLOCKS - 1]}
        victims = [spans[p] for p in right]
        log(f"re-cover: killing the {len(victims)} servers of blocks [4, 8)")
        for proc in victims:
            os.killpg(proc.pid, signal.SIGKILL)
        for proc in victims:
            proc.wait(30)
        seconds = watch.wait(
            lambda: all(set(c) - right for c in watch.coverage()), 180, "every block served again"
        )
        log(f"re-cover: covered again in {seconds:.1f} s")
        return {
            "servers_killed": len(victims),
            "record_expiry_s": 2.5,
            "recover_seconds": round(seconds, 2),
        }
    finally:
        swarm.close()
        groups.kill_all()


def rebalance_phase(groups, ckpt: Path) -> dict:
    swarm = Swarm(groups)
    swarm.start_dht()
    watch = Watch(swarm)
    slow = ("--balance_period", "4")  # long enough to read the swarm before the move
    try:
        start_auto(swarm, ckpt, "a", "--throughput", "100", *slow)
        start_auto(swarm, ckpt, "b", "--throughput", "100", *slow)
        start_auto(swarm, ckpt, "c", "--throughput", "300", *slow)
        joined_at = time.monotonic()
        before = watch.bottleneck()
        servers = {peer: info for block in watch.coverage() for peer, info in block.items()}
        layout = sorted((i.start, i.end, i.throughput) for i in servers.values())
        log(f"rebalance: placed {layout}, bottleneck {before:.0f} tokens/s; waiting for a move")
        watch.wait(lambda: watch.bottleneck() > before, 180, "a rebalancing move")
        after = watch.bottleneck()
        log(f"rebalance: bottleneck {after:.0f} tokens/s after the move")
        return {
            "announced_throughputs": [100, 100, 300],
            "placed_spans": [list(x) for x in layout],
            "bottleneck_before_rebalancing": before,
            "bottleneck_after_rebalancing": after,
            "seconds_to_rebalanced": round(time.monotonic() - joined_at, 2),
            "balance_period_s": 4,
        }
    finally:
        swarm.close()
        groups.kill_all()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.churn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=30, help="least number of generations (default 30)")
    parser.add_argument("--kills", type=int, default=4, help="servers killed and replaced during the churn phase")
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints and logs go (default: tmp)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="corolla-churn-"))
    os.environ.setdefault("COROLLA_CACHE_DIR", str(workdir / "cache"))
    ckpt = write_llama(workdir / PREFIX, num_hidden_layers=BLOCKS, hidden_size=64, intermediate_size=160,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=320, initializer_range=0.08)  # fmt: skip
    log(f"bench.churn: working in {workdir}")
    result = {"model": "tiny llama: 8 blocks, hidden 64", "cpu_cores": os.cpu_count()}
    for name, phase in (
        ("churn", lambda g: churn_phase(g, ckpt, args.generations, args.kills)),
        ("recover", lambda g: recover_phase(g, ckpt)),
        ("rebalance", lambda g: rebalance_phase(g, ckpt)),
    ):
        log(f"phase {name}")
        (workdir / name).mkdir(exist_ok=True)
        groups = ProcessGroups(workdir / name)
        try:
            result[name] = phase(groups)
        finally:
            groups.kill_all()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
