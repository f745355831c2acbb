"""A private swarm on 127.0.0.1: a bootstrap peer and N servers as subprocesses, started and reaped here.

`corolla demo` (and anyone who wants a whole swarm on one machine) uses it as a context manager:

    with LocalSwarm(log_dir) as swarm:
        peers = swarm.start_dht()
        swarm.start_servers(model, num_servers=3, num_blocks=32)
        swarm.wait_ready(dht_prefix, num_blocks=32, timeout=600)

Decisions:

- **The users' command lines.** Each process is `python -m corolla.cli.run_dht` / `run_server` with the
  flags a user would type, bound to 127.0.0.1 on random ports (`/tcp/0`), so nothing collides with
  another swarm and nothing is reachable from outside. The bootstrap peer's first stdout line is its
  multiaddr; every log goes to a file in `log_dir` (the tail is shown when a process dies early).
- **Private.** A swarm key is made in `log_dir` (`swarm.key`) and every process gets it: nothing else on the
  machine can call the servers or read the records (`swarm_key` is the path for the caller's client).
- **Own process groups.** Every subprocess starts in its own session (`start_new_session=True`), so a
  Ctrl-C in the terminal reaches only the demo, which then stops them in order: `close` sends SIGTERM to
  each main process (servers first), waits, and SIGKILLs whatever is left of each group (p2pd included).
  On Linux each child also gets SIGTERM if the demo process itself dies (`PR_SET_PDEATHSIG`), so even a
  SIGKILLed demo leaves no server running.
- **Ready = online in the DHT.** `wait_ready` reads the servers' records with a client-mode `SwarmNode`
  (the same lookup clients use) until every server announces itself ONLINE, not by parsing logs.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
_PR_SET_PDEATHSIG = 1


class SwarmStartError(RuntimeError):
    """A process of the local swarm died or did not get ready in time."""


def split_blocks(num_blocks: int, num_servers: int) -> list[tuple[int, int]]:
    """`num_servers` contiguous, nearly equal spans `[start, end)` covering `0..num_blocks-1`."""
    if not 1 <= num_servers <= num_blocks:
        raise ValueError(f"need 1..{num_blocks} servers for {num_blocks} blocks, got {num_servers}")
    bounds = [i * num_blocks // num_servers for i in range(num_servers + 1)]
    return list(zip(bounds, bounds[1:]))


def threads_per_server(num_servers: int, cores: int | None = None) -> int:
    """Torch threads for each server: the cores shared out, one kept for the client; at least 1."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, (cores - 1) // num_servers)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when this process dies; None where unsupported."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl ran
            os._exit(1)

    return preexec


class LocalSwarm:
    def __init__(self, log_dir: Path, env: dict[str, str] | None = None, python: str = sys.executable):
        from corolla.swarm.trust import SWARM_KEY_ENV, SwarmKey

        self.log_dir, self.python = Path(log_dir), python
        # A private swarm: its key lives with the logs, and every process started here (and the caller's
        # client, given ``swarm_key``) is a member; nothing else on the machine can call its servers.
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.swarm_key = str(self.log_dir / "swarm.key")
        if not os.path.exists(self.swarm_key):
            SwarmKey.generate(self.swarm_key)
        self.env = {**os.environ, **(env or {}), SWARM_KEY_ENV: self.swarm_key}
        self.procs: dict[str, subprocess.Popen] = {}
        self.initial_peers: list[str] = []

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path(name), "w") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                [self.python, *args], stdin=subprocess.DEVNULL, stdout=kwargs.pop("stdout", log), stderr=log,
                env={**self.env, **(env or {})}, start_new_session=True, preexec_fn=_die_with_parent(),
                text=True, **kwargs,
            )  # fmt: skip
        self.procs[name] = proc
        return proc

    def start_dht(self, timeout: float = 120) -> list[str]:
        """Start the bootstrap peer; returns its multiaddr (the first line it prints) as initial peers."""
        proc = self._start("dht", ["-m", "corolla.cli.run_dht", "--host_maddrs", LOOPBACK, "--no_nat_port_map"],
                           stdout=subprocess.PIPE)  # fmt: skip
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().strip() if ready else ""
        if not line.startswith("/"):
            raise SwarmStartError(f"the bootstrap peer printed no address{self.tail('dht')}")
        self.initial_peers = [line]
        return self.initial_peers

    def start_servers(
        self, model: str, num_servers: int, num_blocks: int, extra_args: list[str] = (), num_threads: int = 1
    ) -> list[str]:
        """Start `num_servers` servers splitting the blocks evenly; returns their public names."""
        names = []
        for i, (start, end) in enumerate(split_blocks(num_blocks, num_servers)):
            name = f"server{i}"
            args = ["-m", "corolla.cli.run_server", model, "--block_indices", f"{start}:{end}",
                    "--initial_peers", *self.initial_peers, "--host_maddrs", LOOPBACK, "--no_nat_port_map",
                    "--public_name", name, "--num_threads", str(num_threads), *extra_args]  # fmt: skip
            self._start(name, args, env={"OMP_NUM_THREADS": str(num_threads), "MKL_NUM_THREADS": str(num_threads)})
            names.append(name)
        return names

    def wait_ready(
        self,
        dht_prefix: str,
        num_blocks: int,
        timeout: float,
        progress: Callable[[str], None] = lambda text: None,
    ) -> None:
        """Block until every started server is ONLINE in the DHT; raises SwarmStartError if one dies."""
        from corolla.swarm.node import NetworkConfig
        from corolla.swarm.reader import SwarmReader

        servers = {name for name in self.procs if name != "dht"}
        config = NetworkConfig(initial_peers=tuple(self.initial_peers), host_maddrs=(LOOPBACK,),
                               client_mode=True, nat_port_map=False, swarm_key=self.swarm_key)  # fmt: skip
        with SwarmReader(config, name="corolla-local-swarm") as reader:
            self._poll_online(reader, servers, dht_prefix, num_blocks, timeout, progress)

    def _poll_online(self, reader, servers, dht_prefix, num_blocks, timeout, progress) -> None:
        from corolla.wire.records import ServerState

        start, reported, reported_at = time.monotonic(), None, 0.0
        while True:
            self.check_alive()
            infos = reader.block_infos(dht_prefix, num_blocks)
            states = {info.public_name: info.state for block in infos for info in block.values()}
            online = sorted(name for name in servers if states.get(name) == ServerState.ONLINE)
            if len(online) == len(servers):
                return
            status = ", ".join(f"{name} {states[name].value if name in states else 'starting'}"
                               for name in sorted(servers))  # fmt: skip
            now = time.monotonic()
            if status != reported or now - reported_at > 60:  # a reminder while downloads run
                waited = f", {now - start:.0f} s; logs in {self.log_dir}" if status == reported else ""
                progress(f"{len(online)}/{len(servers)} servers online ({status}{waited})")
                reported, reported_at = status, now
            if now - start > timeout:
                raise SwarmStartError(
                    f"servers not online after {timeout:.0f} s: {status}; logs in {self.log_dir}"
                )
            time.sleep(0.5)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise SwarmStartError(f"{name} exited with code {proc.returncode}{self.tail(name)}")

    def tail(self, name: str, lines: int = 30) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"; last lines of {self.log_path(name)}:\n" + "\n".join(text) if text else ""

    def close(self, timeout: float = 15) -> None:
        """Stop the servers, then the bootstrap peer; SIGKILL whatever is left of every group (p2pd too).

        SIGTERM goes to each main process only: its helpers (p2pd) must outlive it long enough for a
        server to announce itself offline. Servers stop before the bootstrap peer, which they announce to.
        """
        procs = list(self.procs.values())
        deadline = time.monotonic() + timeout
        servers = [proc for name, proc in self.procs.items() if name != "dht"]
        for batch in (servers, [proc for proc in procs if proc not in servers]):
            for proc in batch:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in batch:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for proc in procs:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs.clear()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
