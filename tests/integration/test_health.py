"""`corolla health` against the shared swarm, run as users run it: a subprocess, stdout not a TTY."""

from __future__ import annotations

import json
import re
import signal
import subprocess

SERVERS = {"s0": "[0:4)", "s1": "[3:8)", "s2": "[2:6)"}  # as the shared_swarm fixture starts them


def health_cmd(shared_swarm, model, *extra: str) -> list[str]:
    return ["-m", "corolla.cli.health", "--initial_peers", *shared_swarm.initial_peers,
            "--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--model", str(model), *extra]  # fmt: skip


def table(out: str) -> dict[str, dict[str, str]]:
    """The server table as {server: {column: value}}; columns are separated by two or more spaces."""
    lines = [line.strip() for line in out.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("server "))
    header = re.split(r"\s{2,}", lines[start])
    rows = {}
    for line in lines[start + 2 :]:
        if not line:
            break
        cells = re.split(r"\s{2,}", line)
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_health_shows_coverage_and_servers(shared_swarm, tiny_llama, processes):
    proc = processes.start(health_cmd(shared_swarm, tiny_llama), "health", stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"health exited with {proc.returncode}; log:\n{proc.log_path.read_text()[-3000:]}"

    swarm_line, model_line = out.split("\n\n")[:2]
    assert swarm_line.startswith("swarm: private (key "), out  # the tests' swarms are private
    assert model_line.startswith("model tiny-llama: 8 blocks, 3 servers (3 online)"), out
    coverage = re.search(r"coverage\s+\[([^\]]*)\]", out)
    assert coverage is not None, out
    assert coverage.group(1) == "11232211", out  # s0 [0:4), s2 [2:6), s1 [3:8)
    assert "\x1b[" not in out  # no screen clearing when stdout is not a terminal
    rows = table(out)
    for name, blocks in SERVERS.items():
        assert name in rows, out
        row = rows[name]
        assert (row["blocks"], row["state"]) == (blocks, "online"), out
        assert row["conn"] in ("direct", "relayed") and row["adapters"] == "-" and row["dtype"] == "float32", out
        assert row["version"] != "?" and float(row["tok/s"]) >= 0 and int(row["free cache"]) >= 0, out


def test_health_json_of_a_bare_prefix(shared_swarm, processes):
    """A DHT prefix without --num_blocks: the block count comes from the records; the JSON is the monitor's."""
    proc = processes.start(health_cmd(shared_swarm, "tiny-llama", "--json"), "health-json", stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, proc.log_path.read_text()[-3000:]
    doc = json.loads(out)
    (model,) = doc["models"]
    assert model["dht_prefix"] == "tiny-llama" and model["num_blocks"] == 8 and model["num_blocks_inferred"]
    assert model["fully_covered"] is True
    servers = {s["name"]: s for s in model["servers"]}
    assert {n: f"[{s['info']['start']}:{s['info']['end']})" for n, s in servers.items()} == SERVERS
    assert all(s["info"]["state"] == "online" for s in servers.values())
    assert model["coverage"] == [1, 1, 2, 3, 2, 2, 1, 1]
    assert doc["swarm"]["private"] is True and len(doc["swarm"]["key"]) == 8


def test_health_without_the_key_is_an_outsider_and_says_open(shared_swarm, processes):
    """Without the swarm key, health is an outsider of a private swarm: it finds none of its records, and says
    that it reads as an open swarm."""
    cmd = ["-m", "corolla.cli.health", "--initial_peers", *shared_swarm.initial_peers,
           "--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--swarm_key", "", "--json"]  # fmt: skip
    proc = processes.start(cmd, "health-outsider", stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, proc.log_path.read_text()[-3000:]
    doc = json.loads(out)
    assert doc["swarm"] == {"private": False, "key": None, "ignored_records": {}}
    assert doc["models"] == []


#: Runs the rest of the command line with SIGINT ignored, as a background job of a non-interactive shell starts
IGNORING_SIGINT = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"


def test_health_watch_redraws_until_interrupted(shared_swarm, tiny_llama, processes):
    """Started with SIGINT ignored (inherited), as `corolla health --watch &` in a script or some test runners
    start it: the watch still stops on SIGINT (Python alone would have kept ignoring it, and did)."""
    cmd = ["-c", IGNORING_SIGINT, *health_cmd(shared_swarm, tiny_llama, "--watch", "0.2")]
    proc = processes.start(cmd, "health-watch", stdout=subprocess.PIPE)
    first = [proc.stdout.readline() for _ in range(2)]
    assert first[0].startswith("corolla health  ") and "(every 0.2 s, Ctrl-C to stop)" in first[0], first
    snapshots = 1
    for line in proc.stdout:  # appended snapshots (not a terminal): count the stamps, stop after the third
        if line.startswith("corolla health  "):
            snapshots += 1
            if snapshots == 3:
                break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, proc.log_path.read_text()[-3000:]
    assert snapshots == 3 and "Traceback" not in proc.log_path.read_text()


def test_health_lists_every_model_of_the_swarm_without_being_told(shared_swarm, processes):
    """Without --model, the models come from the swarm's model directory that servers refresh."""
    cmd = ["-m", "corolla.cli.health", "--initial_peers", *shared_swarm.initial_peers,
           "--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--json"]  # fmt: skip
    proc = processes.start(cmd, "health-directory", stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, proc.log_path.read_text()[-3000:]
    doc = json.loads(out)
    models = {m["dht_prefix"]: m for m in doc["models"]}  # other tests may serve other models on this swarm
    model = models["tiny-llama"]
    # the block count comes from the directory, not inferred from the records
    assert model["num_blocks"] == 8 and not model["num_blocks_inferred"]
    assert set(SERVERS) <= {s["name"] for s in model["servers"]}
