"""The swarm of ``bench.wan``: peers on fixed ports behind one delay-proxy process, and an echo server to
measure the proxy's own round trip. Everything on 127.0.0.1, every process in its own process group."""

from __future__ import annotations

import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

from bench.common import ProcessGroups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def maddr(port: int) -> str:
    return f"/ip4/127.0.0.1/tcp/{port}"


class Peer:
    """A swarm process with its real port and the port of the proxy in front of it."""

    def __init__(self, name: str):
        self.name, self.port, self.proxy_port = name, free_port(), free_port()
        self.proc = None
        self.peer_id = None


class WanSwarm:
    """Bootstrap + servers behind one proxy process (restartable with another delay)."""

    def __init__(self, groups: ProcessGroups, workdir: Path, work, args):  # work: bench.wan.Workload
        self.groups, self.workdir, self.ckpt, self.args = groups, workdir, work.ckpt, args
        self.chains, self.num_blocks = work.chains, work.num_blocks
        self.bootstrap = Peer("dht")
        self.servers: dict[int, list[Peer]] = {
            hops: [Peer(f"c{hops}-s{i}") for i in range(len(spans))] for hops, spans in self.chains.items()
        }
        self.echo_port, self.echo_proxy_port = free_port(), free_port()
        self.proxy = None
        self.delay_ms: float | None = None
        self.initial_peers: list[str] = []

    def peers(self) -> list[Peer]:
        return [self.bootstrap, *(p for chain in self.servers.values() for p in chain)]

    def start_proxy(self, delay_ms: float) -> None:
        if self.proxy is not None:
            self.groups.kill(self.proxy, graceful=2)
        pairs = [f"127.0.0.1:{p.proxy_port}=127.0.0.1:{p.port}" for p in self.peers()]
        pairs.append(f"127.0.0.1:{self.echo_proxy_port}=127.0.0.1:{self.echo_port}")
        cmd = ["-m", "bench.delay_proxy", "--delay_ms", str(delay_ms), "--jitter_ms", str(self.args.jitter_ms),
               "--bandwidth_mbit", str(self.args.bandwidth_mbit)]  # fmt: skip
        for pair in pairs:
            cmd += ["--pair", pair]
        self.proxy = self.groups.start(cmd, f"proxy-{delay_ms:g}ms", stdout=subprocess.PIPE)
        if self.proxy.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the delay proxy did not start; see {self.proxy.log_path}")
        self.delay_ms = delay_ms

    def _network_flags(self, peer: Peer, identity: Path) -> list[str]:
        return ["--host_maddrs", maddr(peer.port), "--announce_maddrs", maddr(peer.proxy_port),
                "--identity_path", str(identity)]  # fmt: skip

    def _identity(self, peer: Peer) -> Path:
        from hivemind.p2p import P2P, PeerID

        path = self.workdir / f"{peer.name}.id"
        if not path.exists():
            P2P.generate_identity(str(path))
        peer.peer_id = PeerID.from_identity(path.read_bytes()).to_base58()
        return path

    def start(self) -> None:
        identity = self._identity(self.bootstrap)
        self.bootstrap.proc = self.groups.start(
            ["-m", "corolla.cli.run_dht", *self._network_flags(self.bootstrap, identity)],
            "dht",
            stdout=subprocess.PIPE,
        )
        self.bootstrap.proc.stdout.readline()  # its addresses: we know them (the proxy's)
        self.initial_peers = [f"{maddr(self.bootstrap.proxy_port)}/p2p/{self.bootstrap.peer_id}"]
        for hops, spans in self.chains.items():
            if hops not in self.args.servers:
                continue
            for peer, (a, b) in zip(self.servers[hops], spans):
                identity = self._identity(peer)
                cmd = ["-m", "corolla.cli.run_server", str(self.ckpt), "--block_indices", f"{a}:{b}",
                       "--initial_peers", *self.initial_peers, *self._network_flags(peer, identity),
                       "--public_name", peer.name, "--dht_prefix", f"wan{hops}", "--num_threads", "1",
                       "--update_period", "15"]  # fmt: skip
                peer.proc = self.groups.start(cmd, peer.name, env={"OMP_NUM_THREADS": "1"})

    def wait_online(self, timeout: float = 300) -> None:
        from corolla.swarm.bridge import LoopThread
        from corolla.swarm.node import NetworkConfig, SwarmNode
        from corolla.wire.records import ServerState

        bridge = LoopThread("wan-watcher")
        config = NetworkConfig(initial_peers=tuple(self.initial_peers), client_mode=True)
        node = bridge.run(SwarmNode.start(config))
        try:
            deadline = time.monotonic() + timeout
            for hops in self.args.servers:
                pending = {p.peer_id: p for p in self.servers[hops]}
                while pending:
                    for peer in pending.values():
                        if peer.proc.poll() is not None:
                            raise RuntimeError(f"{peer.name} exited; see {peer.proc.log_path}")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"not online after {timeout} s: {[p.name for p in pending.values()]}")
                    for servers in bridge.run(node.records.block_infos(f"wan{hops}", self.num_blocks)):
                        for peer_id, info in servers.items():
                            if info.state == ServerState.ONLINE:
                                pending.pop(peer_id, None)
                    time.sleep(0.3)
        finally:
            bridge.run(node.shutdown(), timeout=10)
            bridge.shutdown()

    def bypassing_connections(self) -> list[str]:
        """Established TCP connections to a peer's real port made by anything but the proxy."""
        out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True, text=True).stdout
        real = {p.port for p in self.peers()}
        bad = []
        for line in out.splitlines():
            fields = line.split()
            if len(fields) < 4:
                continue
            peer_port = int(fields[3].rpartition(":")[2])
            if peer_port in real and f"pid={self.proxy.pid}," not in line:
                bad.append(line.strip())
        return bad


def echo_rtt_ms(swarm: WanSwarm, rounds: int = 20) -> float:
    """Median round trip of 64 bytes through the proxy to an echo server in this process."""
    with socket.create_connection(("127.0.0.1", swarm.echo_proxy_port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            sock.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(sock.recv(64 - got))
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def start_echo(port: int) -> None:
    server = socket.create_server(("127.0.0.1", port))

    def serve_one(conn):
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept():
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
