"""How a peer joins the swarm: a plain dataclass, importable without the network stack (so that commands
answer ``--help`` at once)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NetworkConfig:
    """How a peer joins the swarm (Petals' flag names)."""

    initial_peers: tuple[str, ...] = ()
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    identity_path: str | None = None
    #: the private swarm's key file (None: $COROLLA_SWARM_KEY if set, else an open swarm; "": open; see
    #: corolla.swarm.trust)
    swarm_key: str | None = None
    client_mode: bool = False
    #: UPnP/NAT-PMP port mapping: useful at home, pointless (and slow to give up) on loopback.
    nat_port_map: bool = True
    #: Seconds the DHT waits for a peer's answer.
    dht_wait_timeout: float = 3.0
