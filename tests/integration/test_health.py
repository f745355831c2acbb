"""`corolla health` against the shared swarm, run as users run it: a one-shot subprocess, stdout not a TTY."""

from __future__ import annotations

import re
import subprocess

SERVERS = {"s0": "[0:4)", "s1": "[3:8)", "s2": "[2:6)"}  # as the shared_swarm fixture starts them


def test_health_shows_coverage_and_servers(shared_swarm, tiny_llama, processes):
    cmd = ["-m", "corolla.cli.health", "--initial_peers", *shared_swarm.initial_peers,
           "--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--model", str(tiny_llama)]  # fmt: skip
    proc = processes.start(cmd, "health", stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"health exited with {proc.returncode}; log:\n{proc.log_path.read_text()[-3000:]}"

    assert out.startswith("model tiny-llama: 8 blocks"), out
    coverage = re.search(r"coverage\s+\[([^\]]*)\]", out)
    assert coverage is not None, out
    assert len(coverage.group(1)) == 8 and "." not in coverage.group(1), out
    assert "\x1b[" not in out  # no screen clearing when stdout is not a terminal
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    for name, blocks in SERVERS.items():
        assert name in rows, out
        assert rows[name][1:3] == [blocks, "online"], out
        assert rows[name][-1] in ("direct", "relayed"), out
