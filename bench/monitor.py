"""The health views (``corolla health``, ``corolla monitor``): their cost per refresh and how fast they show a
loss. Prints JSON on stdout; progress on stderr.

    python -m bench.monitor [--no_live] [--workdir DIR]

1. **synthetic** (no network): one model of 80 blocks with S servers (S = 10, 100, 1000) each announcing
   a random span. Per refresh: decoding the packed records, which a DHT read already does (the
   reference), vs building the state, serializing it to JSON and formatting the text table.
2. **live**: bootstrap + two tiny-llama servers ([0:4), [4:8), ``--update_period 1``) and ``corolla
   monitor --refresh 0.5`` as users run it. Time from start to the first full picture; ``/api/v1/state``
   latency (median of 50 GETs) vs one DHT read of the same records through a client-mode peer (the
   reference: what each refresh costs in the background); time from SIGTERM of one server until
   the gap shows in ``/api/v1/state``; time from SIGKILL of the other until its records expire and it
   leaves the state (about its record lifetime, 2.5 x the update period, plus a refresh).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import LOOPBACK, ProcessGroups, Swarm, log, write_llama

BLOCKS = 80
SIZES = (10, 100, 1000)
PREFIX = "monitor-llama"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def timed_ms(fn, reps: int) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``reps`` runs, in ms, and its last result."""
    times, result = [], None
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result


def synthetic(num_servers: int, seed: int = 0) -> dict:
    from corolla.cli.health_table import format_model
    from corolla.monitor.state import model_state, swarm_json
    from corolla.wire.codec import pack, unpack
    from corolla.wire.records import ServerInfo, ServerState

    rng = random.Random(seed)
    packed: list[dict[str, bytes]] = [{} for _ in range(BLOCKS)]
    for i in range(num_servers):
        length = rng.randint(4, 20)
        start = rng.randint(0, BLOCKS - length)
        info = ServerInfo(
            state=rng.choice([ServerState.ONLINE] * 8 + [ServerState.JOINING, ServerState.OFFLINE]), start=start,
            end=start + length, public_name=f"server-{i}", throughput=rng.uniform(10, 1000),
            inference_latency=rng.uniform(0.001, 0.05), free_cache_tokens=rng.randint(0, 1 << 16),
            software_version="0.1.0", config_hash="ab" * 32, next_rtts=((f"peer{i + 1}", 0.003),),
        )  # fmt: skip
        value = pack(info)
        for b in range(start, start + length):
            packed[b][f"12D3KooW{i:044d}"] = value
    reps = 5 if num_servers >= 1000 else 20

    decode_ms, records = timed_ms(
        lambda: [{p: unpack(ServerInfo, v, max_tensor_bytes=0) for p, v in block.items()} for block in packed],
        reps,
    )
    build_ms, state = timed_ms(lambda: model_state(PREFIX, records), reps)
    json_ms, text = timed_ms(lambda: json.dumps(swarm_json([state], updated_at=time.time())), reps)
    table_ms, _ = timed_ms(lambda: format_model(state), reps)
    return {
        "servers": num_servers,
        "records": sum(len(b) for b in packed),
        "decode_records_ms (reference: part of every DHT read)": round(decode_ms, 3),
        "build_state_ms": round(build_ms, 3),
        "state_json_ms": round(json_ms, 3),
        "health_table_ms": round(table_ms, 3),
        "state_json_kib": round(len(text) / 1024, 1),
        "build_state_vs_decode": round(build_ms / decode_ms, 3),
    }


def get_state(url: str) -> dict:
    with NO_PROXY.open(url + "api/v1/state", timeout=30) as response:
        return json.load(response)


def wait_state(url: str, predicate, what: str, timeout: float = 180) -> tuple[float, dict]:
    """Seconds until ``predicate(model)`` holds for the model in /api/v1/state (polled every 50 ms)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        models = [m for m in get_state(url)["models"] if m["dht_prefix"] == PREFIX]
        if models and predicate(models[0]):
            return time.monotonic() - start, models[0]
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


def live(workdir: Path) -> dict:
    from corolla.swarm.node import NetworkConfig
    from corolla.swarm.reader import SwarmReader

    ckpt = write_llama(workdir / PREFIX, num_hidden_layers=8, hidden_size=64, intermediate_size=160,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=320)  # fmt: skip
    groups = ProcessGroups(workdir)
    try:
        swarm = Swarm(groups)
        swarm.start_dht()
        servers = {
            name: swarm.start_server(name, ckpt, blocks, PREFIX, extra=("--update_period", "1"))
            for name, blocks in (("a", "0:4"), ("b", "4:8"))
        }
        swarm.wait_online(list(servers.values()), PREFIX, 8)
        log("servers online; starting corolla monitor")
        started = time.monotonic()
        monitor = groups.start(
            ["-m", "corolla.cli.main", "monitor", "--initial_peers", *swarm.initial_peers, "--host_maddrs",
             LOOPBACK, "--model", PREFIX, "--num_blocks", "8", "--port", "0", "--refresh", "0.5"],
            "monitor", stdout=subprocess.PIPE,
        )  # fmt: skip
        url = monitor.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"monitor printed {url!r}; see {monitor.log_path}")
        listening = time.monotonic() - started
        wait_state(url, lambda m: m["num_online"] == 2 and m["fully_covered"], "both servers")
        first_picture = time.monotonic() - started

        api_ms, _ = timed_ms(lambda: get_state(url), 50)
        config = NetworkConfig(initial_peers=tuple(swarm.initial_peers), host_maddrs=(LOOPBACK,), client_mode=True)
        with SwarmReader(config, name="bench-monitor-reader") as reader:
            reader.block_infos(PREFIX, 8)  # warm: routing table filled
            dht_ms, _ = timed_ms(lambda: reader.block_infos(PREFIX, 8), 20)

        log("SIGTERM to server b")
        servers["b"].send_signal(signal.SIGTERM)
        gap_s, _ = wait_state(url, lambda m: m["gaps"] == [4, 5, 6, 7], "the gap after SIGTERM")
        log("SIGKILL to server a")
        os.killpg(servers["a"].pid, signal.SIGKILL)
        expire_s, _ = wait_state(
            url, lambda m: all(s["name"] != "a" for s in m["servers"]), "a's records to expire"
        )
        monitor.send_signal(signal.SIGTERM)
        exit_code = monitor.wait(60)
        return {
            "monitor_listening_s": round(listening, 2),
            "monitor_first_full_picture_s": round(first_picture, 2),
            "api_state_ms_median": round(api_ms, 2),
            "dht_read_ms_median (reference: one background refresh)": round(dht_ms, 2),
            "sigterm_to_gap_in_state_s": round(gap_s, 2),
            "sigkill_to_server_gone_s": round(expire_s, 2),
            "server_update_period_s": 1.0,
            "monitor_refresh_s": 0.5,
            "monitor_exit_code_on_sigterm": exit_code,
        }
    finally:
        groups.kill_all()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.monitor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no_live", action="store_true", help="only the synthetic part (no swarm)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the checkpoint and logs go (default: tmp)"
    )
    args = parser.parse_args()
    result: dict = {"cpu_cores": os.cpu_count(), "synthetic_blocks": BLOCKS}
    log("synthetic swarms")
    result["synthetic"] = [synthetic(n) for n in SIZES]
    if not args.no_live:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="corolla-bench-monitor-"))
        log(f"live swarm in {workdir}")
        result["live"] = live(workdir)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
