"""Pieces every benchmark shares: random checkpoints written by transformers, a loopback swarm of
subprocesses (each in its own process group, torn down by ``os.killpg``), DHT-based readiness, and
small timing helpers. Progress goes to stderr; benchmarks print JSON on stdout.

It is also run as a program by the benchmarks' servers: ``python -m bench.common probe_server ARGS`` is
``corolla server ARGS`` (the very ``run_server.main``) plus ``time.perf_counter()`` stamps (CLOCK_MONOTONIC:
comparable between processes on one Linux machine) when a message has been read and decoded, around the compute
worker's run of an inference step, and around writing each reply; SIGUSR1 dumps them as JSON to
``$COROLLA_PROBE_OUT``. A few list appends per step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
ROOT = Path(__file__).resolve().parents[1]  # subprocesses import corolla (and bench) from this checkout
#: One torch/OpenMP thread per server process: two cores run every process of a loopback swarm.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def log(*parts: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def write_llama(path: Path, *, seed: int = 0, max_shard_size: str = "200MB", **overrides) -> Path:
    """A random Llama saved by transformers itself (sharded safetensors + index), seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    params = dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, initializer_range=0.02, tie_word_embeddings=False,
    )  # fmt: skip
    params.update(overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**params))
    model.save_pretrained(path, max_shard_size=max_shard_size)
    del model
    return path


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class ProcessGroups:
    """Subprocesses each in its own session/process group; ``kill_all`` reaps every group it started."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], name: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "w")  # noqa: SIM115 - closed in kill_all
        proc = subprocess.Popen(
            [sys.executable, *args], stdout=kwargs.pop("stdout", log_file), stderr=log_file,
            stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **CHILD_ENV, **(env or {})},
            text=True, cwd=ROOT, **kwargs,
        )  # fmt: skip
        proc.log_path, proc.log_file, proc.name = log_path, log_file, name
        self.procs.append(proc)
        return proc

    @staticmethod
    def signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self, proc: subprocess.Popen, graceful: float = 5.0) -> None:
        """SIGTERM the group, wait up to ``graceful`` s, then SIGKILL whatever is left of it."""
        self.signal_group(proc, signal.SIGCONT)
        self.signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(graceful)
        except subprocess.TimeoutExpired:
            pass
        self.signal_group(proc, signal.SIGKILL)  # p2pd and the reaper of the group, if any are left
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if not proc.log_file.closed:
            proc.log_file.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def kill_many(self, procs, graceful: float = 5.0) -> None:
        """SIGTERM every group at once, wait up to ``graceful`` s in all, then SIGKILL what is left."""
        procs = list(procs)
        for proc in procs:
            self.signal_group(proc, signal.SIGCONT)
            self.signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + graceful
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self.kill(proc, graceful=0)

    def kill_all(self) -> None:
        self.kill_many(self.procs, graceful=8)


class Swarm:
    """A bootstrap peer and servers on 127.0.0.1; readiness is read from the DHT (state ONLINE)."""

    def __init__(self, groups: ProcessGroups):
        self.groups = groups
        self.initial_peers: list[str] = []
        self._watcher = None

    def start_dht(self) -> list[str]:
        proc = self.groups.start(["-m", "corolla.cli.run_dht", "--host_maddrs", LOOPBACK], "dht", stdout=-1)
        line = proc.stdout.readline().strip()
        if not line.startswith("/ip4/127.0.0.1/"):
            raise RuntimeError(f"bootstrap peer printed {line!r}; see {proc.log_path}")
        self.initial_peers = [line]
        return self.initial_peers

    def start_server(
        self,
        name: str,
        model: Path,
        blocks: str | None,
        dht_prefix: str,
        num_threads: int = 1,
        probe: bool = False,
        extra: tuple[str, ...] = (),
    ):
        """``corolla server`` as users run it; ``probe`` runs the same main() through ``probe_server``.

        ``blocks`` None leaves the choice to the server (give ``--num_blocks`` in ``extra``, or nothing)."""
        from hivemind.p2p import P2P, PeerID

        identity = self.groups.log_dir / f"{name}.id"
        if not identity.exists():
            P2P.generate_identity(str(identity))
        entry = ["-m", "bench.common", "probe_server"] if probe else ["-m", "corolla.cli.run_server"]
        placement = ["--block_indices", blocks] if blocks is not None else []
        cmd = [*entry, str(model), *placement,
               "--initial_peers", *self.initial_peers, "--host_maddrs", LOOPBACK,
               "--identity_path", str(identity), "--public_name", name, "--dht_prefix", dht_prefix,
               "--num_threads", str(num_threads), "--update_period", "30", *extra]  # fmt: skip
        env = {"OMP_NUM_THREADS": str(num_threads), "MKL_NUM_THREADS": str(num_threads)}
        probe_out = self.groups.log_dir / f"{name}.probe.json" if probe else None
        if probe_out is not None:
            env["COROLLA_PROBE_OUT"] = str(probe_out)
        proc = self.groups.start(cmd, name, env=env)
        proc.peer_id = PeerID.from_identity(identity.read_bytes()).to_base58()
        proc.probe_out = probe_out
        return proc

    @staticmethod
    def probe_records(proc, timeout: float = 10.0) -> dict | None:
        """Ask a server started with ``probe=True`` for its timestamps (SIGUSR1) and read them."""
        import json

        if proc.probe_out is None:
            return None
        path = Path(proc.probe_out)
        before = path.stat().st_mtime_ns if path.exists() else 0
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and path.stat().st_mtime_ns != before:
                return json.loads(path.read_text())
            time.sleep(0.02)
        return None

    def _watch(self):
        if self._watcher is None:
            from corolla.swarm.bridge import LoopThread
            from corolla.swarm.node import NetworkConfig, SwarmNode

            bridge = LoopThread("bench-watcher")
            config = NetworkConfig(
                initial_peers=tuple(self.initial_peers), host_maddrs=(LOOPBACK,), client_mode=True
            )
            self._watcher = (bridge, bridge.run(SwarmNode.start(config)))
        return self._watcher

    def wait_online(self, procs, dht_prefix: str, num_blocks: int, timeout: float = 300) -> None:
        from corolla.wire.records import ServerState

        bridge, node = self._watch()
        deadline = time.monotonic() + timeout
        pending = {p.peer_id: p for p in procs}
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"servers not online after {timeout} s: {[p.name for p in pending.values()]}")
            for proc in pending.values():
                if proc.poll() is not None:
                    raise RuntimeError(f"server {proc.name} exited with {proc.returncode}; see {proc.log_path}")
            for servers in bridge.run(node.records.block_infos(dht_prefix, num_blocks)):
                for peer, info in servers.items():
                    if info.state == ServerState.ONLINE:
                        pending.pop(peer, None)
            if pending:
                time.sleep(0.2)

    def close(self) -> None:
        if self._watcher is not None:
            bridge, node = self._watcher
            try:
                bridge.run(node.shutdown(), timeout=10)
            except Exception:
                pass
            bridge.shutdown()
            self._watcher = None


class CpuMonitor:
    """CPU used on this machine by processes other than this one and its descendants, in cores.

    Others share the machine (tests, other benchmarks); their load is reported next to every timing. A descendant
    that exits in a window (a killed server's p2pd) keeps the CPU time it was last seen with: dropping it would
    count its whole past as others' load.
    """

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self._start = None
        self._seen: dict[tuple[int, float], float] = {}  # (pid, create time) -> CPU seconds when last seen

    def _mine(self) -> float:
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                self._seen[(proc.pid, proc.create_time())] = t.user + t.system
            except self.psutil.Error:
                pass
        return sum(self._seen.values())

    def _busy(self) -> float:
        t = self.psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0) - getattr(t, "guest", 0.0)

    def start(self) -> None:
        self._seen.clear()
        self._start = (time.perf_counter(), self._busy(), self._mine())

    def foreign_cores(self) -> float:
        wall, busy, mine = self._start
        return max(0.0, (self._busy() - busy) - (self._mine() - mine)) / max(1e-6, time.perf_counter() - wall)

    def wait_quiet(self, threshold: float = 0.3, max_wait: float = 20.0, window: float = 0.5) -> dict:
        """Wait (up to ``max_wait`` s) for a ``window`` in which others use under ``threshold`` cores."""
        t0 = time.perf_counter()
        while True:
            self.start()
            time.sleep(window)
            load = self.foreign_cores()
            waited = time.perf_counter() - t0
            if load < threshold or waited >= max_wait:
                return {"waited_s": round(waited, 2), "foreign_cores_before": round(load, 3)}


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (not its children: p2pd is counted apart)."""
    import psutil

    return psutil.Process(pid).memory_info().rss


def rss_file_bytes(pid: int) -> int:
    """The file-backed and shared part of a process's RSS (Linux: RssFile + RssShmem)."""
    import psutil

    return getattr(psutil.Process(pid).memory_info(), "shared", 0)


def children_rss(pid: int) -> int:
    import psutil

    total = 0
    for child in psutil.Process(pid).children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_on_peer_loop(coro):
    """``asyncio.run(coro)`` on the event loop corolla's peers run (uvloop when installed), so that what the
    bench measures next to them pays the same loop costs."""
    import asyncio

    try:
        from corolla.swarm.loop import new_event_loop
    except ImportError:  # a corolla from before its peers chose their loop
        return asyncio.run(coro)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


# ---- programs run as subprocesses ----------------------------------------------------------------------


def probe_server(argv: list[str]) -> None:
    import json

    import corolla.server.compute as compute_module
    import corolla.server.handlers as handlers_module
    from corolla.cli.run_server import main as run_server

    records: dict[str, list[float]] = {k: [] for k in ("read_done", "begin", "end", "write_begin", "write_end")}
    read, write = handlers_module.read_message, handlers_module.write_message
    run = compute_module.step_sessions
    clock = time.perf_counter

    async def read_message(*args, **kwargs):
        message = await read(*args, **kwargs)
        records["read_done"].append(clock())
        return message

    async def write_message(*args, **kwargs):
        records["write_begin"].append(clock())
        await write(*args, **kwargs)
        records["write_end"].append(clock())

    def step_sessions(*args, **kwargs):  # on the compute thread: one batch of steps
        records["begin"].append(clock())
        out = run(*args, **kwargs)
        records["end"].append(clock())
        return out

    def dump(*_: object) -> None:
        path = os.environ["COROLLA_PROBE_OUT"]
        with open(path + ".tmp", "w") as f:
            json.dump({k: list(v) for k, v in records.items()}, f)
        os.replace(path + ".tmp", path)

    handlers_module.read_message, handlers_module.write_message = read_message, write_message
    compute_module.step_sessions = step_sessions
    signal.signal(signal.SIGUSR1, dump)
    run_server(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["probe_server"]:
        probe_server(sys.argv[2:])
    else:
        sys.exit("usage: python -m bench.common probe_server ARGS...")
