"""One peer's presence in the swarm: the libp2p daemon (hivemind ``P2P``) and a DHT node on top of it.

corolla runs hivemind's ``DHTNode`` inside the caller's event loop instead of hivemind's ``DHT``
process: one fewer Python process per peer (memory and a core matter on small machines), and no
pipe hop for every DHT call. The only helper process is ``p2pd``, registered with the reaper so it
dies with us whatever kills us.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile

from hivemind.dht import DHTNode
from hivemind.p2p import P2P, PeerID

from corolla.swarm import reaper
from corolla.swarm.config import NetworkConfig
from corolla.swarm.discovery import RecordStore, RecordValidator
from corolla.swarm.trust import PeerKey, SwarmKey, Trust, swarm_key_path

logger = logging.getLogger(__name__)


class SwarmNode:
    """A started P2P daemon plus DHT node. Create with :meth:`start`; call :meth:`shutdown` when done."""

    def __init__(
        self,
        p2p: P2P,
        dht: DHTNode,
        config: NetworkConfig,
        daemon_pids: tuple[int, ...],
        trust: Trust,
        validator: RecordValidator,
    ):
        self.p2p = p2p
        self.dht = dht
        self.config = config
        self.daemon_pids = daemon_pids
        #: this peer's keys; its records are signed (and sealed in a private swarm) with them
        self.trust = trust
        self.records = RecordStore(dht, trust)
        #: the DHT node's record validator (its ``refused`` counts invalid values it dropped)
        self.validator = validator

    @classmethod
    async def start(cls, config: NetworkConfig) -> SwarmNode:
        # Read before anything starts: a bad key file fails at once, with its own message.
        key_path = swarm_key_path(config.swarm_key)
        swarm_key = SwarmKey.load(key_path) if key_path else None
        before = set(reaper.children_named("p2pd"))
        with tempfile.TemporaryDirectory(prefix="corolla-identity-") as tmp:
            # The peer signs its records with its libp2p key, so Python must hold it: without an identity
            # file of the user's, a fresh one is made for this run (the daemon reads it at start).
            identity_path = config.identity_path or os.path.join(tmp, "identity.key")
            if config.identity_path is None:
                P2P.generate_identity(identity_path)
            p2p = await P2P.create(
                initial_peers=list(config.initial_peers) or None,
                host_maddrs=list(config.host_maddrs),
                announce_maddrs=list(config.announce_maddrs) or None,
                identity_path=identity_path,
                check_if_identity_free=config.identity_path is not None,
                dht_mode="client" if config.client_mode else "server",
                nat_port_map=config.nat_port_map and not _is_loopback(config.host_maddrs),
            )
            daemon_pids = tuple(set(reaper.children_named("p2pd")) - before)
            for pid in daemon_pids:
                reaper.watch(pid)
            try:
                trust = Trust(PeerKey.from_identity_file(identity_path), swarm_key)
            except BaseException:
                await p2p.shutdown()
                raise
        validator = RecordValidator(swarm_key)
        try:
            if trust.peer_key.peer_id != p2p.peer_id.to_base58():
                raise RuntimeError(f"p2pd runs as {p2p.peer_id}, not as its identity file's peer")
            dht = await DHTNode.create(
                p2p=p2p,
                initial_peers=list(config.initial_peers) or None,
                client_mode=config.client_mode,
                wait_timeout=config.dht_wait_timeout,
                record_validator=validator,
            )
        except BaseException:
            await p2p.shutdown()
            raise
        (logger.info if swarm_key or config.client_mode else logger.warning)(
            "Joined the swarm as %s (%s; %s)",
            p2p.peer_id,
            "client" if config.client_mode else "DHT server",
            f"private swarm, key {swarm_key.fingerprint}"
            if swarm_key
            else "OPEN swarm: no swarm key, anyone who reaches this peer can join and call it",
        )
        return cls(p2p, dht, config, daemon_pids, trust, validator)

    @property
    def peer_id(self) -> PeerID:
        return self.p2p.peer_id

    async def visible_maddrs(self) -> list[str]:
        """Multiaddrs others can pass as ``--initial_peers``, each ending with ``/p2p/<peer id>``."""
        maddrs = await self.p2p.get_visible_maddrs()
        return [str(m) if "/p2p/" in str(m) else f"{m}/p2p/{self.peer_id}" for m in maddrs]

    def daemon_alive(self) -> bool:
        """Whether our p2pd still runs (a Ctrl-C in a terminal signals the whole group, p2pd included)."""
        return any(reaper.is_running(pid) for pid in self.daemon_pids) if self.daemon_pids else True

    async def shutdown(self, timeout: float = 5.0) -> None:
        if not self.daemon_alive():
            timeout = min(timeout, 0.5)  # nothing left to talk to
        try:
            await asyncio.wait_for(self.dht.shutdown(), timeout)
        except (asyncio.TimeoutError, OSError) as e:
            logger.debug("DHT shutdown did not finish cleanly: %r", e)
        await asyncio.wait_for(self.p2p.shutdown(), timeout)


def _is_loopback(maddrs: tuple[str, ...]) -> bool:
    return bool(maddrs) and all(m.startswith(("/ip4/127.", "/ip6/::1/")) for m in maddrs)
