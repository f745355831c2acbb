"""A real swarm on 127.0.0.1 for tests: a bootstrap peer and servers as subprocesses, started through the
same command lines users run, and a watcher that reads the DHT to know when a server is online."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
from hivemind.p2p import P2P, PeerID

from corolla.client.sequence_manager import RemoteSequenceManager
from corolla.models.checkpoint import Checkpoint
from corolla.swarm.node import NetworkConfig
from corolla.swarm.reader import SwarmReader
from corolla.wire.records import ServerState

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


class Swarm:
    def __init__(self, groups, workdir: Path):
        self.groups, self.workdir = groups, workdir
        self.initial_peers: list[str] = []
        self.servers: dict[str, object] = {}  # name -> Popen, with .peer_id
        self._watcher: SwarmReader | None = None

    def start_dht(self) -> list[str]:
        proc = self.groups.start(["-m", "corolla.cli.run_dht", "--host_maddrs", LOOPBACK], "dht", stdout=-1)
        line = proc.stdout.readline().strip()
        assert line.startswith("/ip4/127.0.0.1/"), f"bootstrap peer printed {line!r}; see {proc.log_path}"
        self.initial_peers = [line]
        return self.initial_peers

    def start_server(
        self, name: str, model: Path | str, *args: str, wait: bool = True, identity: Path | None = None
    ):
        identity = identity or self.workdir / f"{name}.id"
        if not identity.exists():
            P2P.generate_identity(str(identity))
        cmd = ["-m", "corolla.cli.run_server", str(model), "--initial_peers", *self.initial_peers,
               "--host_maddrs", LOOPBACK, "--identity_path", str(identity), "--public_name", name,
               "--num_threads", "1", "--update_period", "2", *args]  # fmt: skip
        proc = self.groups.start(cmd, name)
        proc.peer_id = PeerID.from_identity(identity.read_bytes()).to_base58()
        proc.identity = identity
        self.servers[name] = proc
        if wait:
            self.wait_state(proc, ServerState.ONLINE, model_prefix(model))
        return proc

    def records(self, dht_prefix: str, num_blocks: int):
        if self._watcher is None:
            config = NetworkConfig(
                initial_peers=tuple(self.initial_peers), host_maddrs=(LOOPBACK,), client_mode=True
            )
            self._watcher = SwarmReader(config, name="test-swarm-watcher")
        return self._watcher.block_infos(dht_prefix, num_blocks)

    def wait_state(self, proc, state: ServerState, dht_prefix: str, num_blocks: int = 8, timeout: float = 120):
        """Wait until the DHT shows ``proc``'s records in ``state`` (timeout only guards against a hang)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None and state != ServerState.OFFLINE:
                raise AssertionError(
                    f"server exited with {proc.returncode}; log:\n{proc.log_path.read_text()[-3000:]}"
                )
            for servers in self.records(dht_prefix, num_blocks):
                info = servers.get(proc.peer_id)
                if info is not None and info.state == state:
                    return info
            time.sleep(0.2)
        raise AssertionError(f"server {proc.peer_id} not {state.value} after {timeout} s; see {proc.log_path}")

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None


def model_prefix(model: Path | str) -> str:
    from corolla.models.checkpoint import default_dht_prefix

    return default_dht_prefix(str(model))


def helper_pids(pid: int) -> list[int]:
    """Live descendants of ``pid`` (its p2pd and reaper), to check that none outlive it."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def make_manager(model, initial_peers, **options) -> RemoteSequenceManager:
    options.setdefault("update_period", 1.0)
    return RemoteSequenceManager.from_pretrained_args(
        model_ref=str(model), config=Checkpoint(str(model)).config, initial_peers=initial_peers, **options
    )
