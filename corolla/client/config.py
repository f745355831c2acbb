"""Client settings: where the swarm is, and the resilience policy (deadlines, bans, retries, waits)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClientConfig:
    initial_peers: tuple[str, ...] = ()
    dht_prefix: str | None = None
    #: A private swarm's key file (``corolla swarm-key``): proves membership to its servers and opens its
    #: records. None: $COROLLA_SWARM_KEY if set, else an open swarm ("" forces open); a private swarm's servers
    #: refuse a client without its key with NotAMemberError.
    swarm_key: str | None = None
    #: Bounded wait for blocks that no usable server hosts before raising MissingBlocksError.
    missing_blocks_timeout: float = 60.0
    #: A step's deadline is max(step_timeout_floor, step_timeout_factor x the step time expected from the
    #: server's measured history); past it the server is pinged, and banned if the ping fails.
    step_timeout_floor: float = 0.3
    step_timeout_factor: float = 5.0
    ping_timeout: float = 0.7
    #: How long a failed server is avoided; doubles on each repeated failure, up to max_ban_timeout.
    ban_timeout: float = 15.0
    max_ban_timeout: float = 300.0
    #: Failures tolerated in one call (a step, a chain repair, a forward) before ChainFailedError.
    max_retries: int | None = 16
    #: Backoff between attempts when nothing usable is left.
    min_backoff: float = 0.25
    max_backoff: float = 5.0
    #: Longest a forward call or a step of a live (answering pings) server may take.
    request_timeout: float = 180.0
    #: Re-read the DHT this often in the background (and at once when no route can be found).
    update_period: float = 30.0
    #: A usable server missing from one DHT lookup is kept this long (lookups can miss records).
    keep_absent: float = 60.0
    #: Largest message sent; larger batches and replays are split.
    max_message_bytes: int = 64 * 1024 * 1024
    #: Log every planned route at INFO (otherwise DEBUG).
    show_route: bool = False
    #: Use only these servers (peer ids), if set; never use those in blocked_servers.
    allowed_servers: frozenset[str] | None = None
    blocked_servers: frozenset[str] = frozenset()
    #: Refuse servers that announce quantized weights (``--quant_type int8/nf4``): full-precision blocks only.
    require_full_precision: bool = False
    #: Where the client's libp2p daemon listens (a client needs no public address).
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    #: Inference steps go server to server (each server pushes its output to the next hop's session and also
    #: returns it here); False relays every hop through the client. A late or lost push is relayed anyway.
    push: bool = True
    #: Lossy 8-bit activations for bandwidth-bound links: "int8" sends every step's hidden states, and has
    #: servers return and push theirs, as int8 with a scale per token (about 4x fewer bytes than float32; the
    #: results change slightly). None: hidden states travel in the dtype the server computes in (lossless).
    activation_compression: str | None = None
    #: Served LoRA adapter for every request and session unless one names another (Petals' name); None = base.
    active_adapter: str | None = None
    #: Catch servers that return wrong activations (corolla.client.verification): each hop's first step (the
    #: prefill, or its first step after a failover) is re-run as a stateless forward on another server of the same
    #: dtype and quantization, when one exists, and compared before the step's result is used; a liar is banned
    #: and the session recomputed without it. Costs one extra forward of the prompt per hop (on a replica,
    #: concurrently with the chain). False: no checks at all.
    verify: bool = True
    #: Probability that a later step of a hop is checked too. A check re-runs the hop's whole history (it covers
    #: every earlier step), so its cost grows with the session: about fraction x length tokens of forward per step.
    verify_fraction: float = 0.05
    #: Largest per-token relative error accepted from a server; None: per dtype (verification.TOLERANCES).
    verify_tolerance: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.verify_fraction <= 1.0:
            raise ValueError(f"verify_fraction must be in [0, 1], got {self.verify_fraction}")
        if self.activation_compression not in (None, "int8"):
            raise ValueError(f"activation_compression must be None or 'int8', got {self.activation_compression!r}")
        # users pass lists or sets of peer ids (str or hivemind PeerID); keep them as frozensets of str
        if self.allowed_servers is not None:
            object.__setattr__(self, "allowed_servers", frozenset(map(str, self.allowed_servers)))
        object.__setattr__(self, "blocked_servers", frozenset(map(str, self.blocked_servers)))


#: Petals' client options that corolla has under another name (Petals name -> ClientConfig field)
PETALS_RENAMED = {"use_server_to_server": "push"}
#: Petals' client options with no equivalent here, and why; refused by name rather than ignored
PETALS_UNSUPPORTED = {
    "daemon_startup_timeout": "corolla's client starts its libp2p daemon with hivemind's default timeout",
    "connect_timeout": "corolla bounds a connection by ping_timeout and request_timeout",
    "max_pinged": "corolla pings every server it may route through, once, and keeps the round-trip times",
}


def client_config(**options) -> ClientConfig:
    """A `ClientConfig` from keyword options, also under Petals' names (`PETALS_RENAMED`; `show_route=
    "inference"` means True: corolla logs every route it plans). Unknown options, and Petals' options
    corolla does not have (`PETALS_UNSUPPORTED`), raise a TypeError that names them."""
    import dataclasses

    for petals_name, name in PETALS_RENAMED.items():
        if petals_name in options:
            if name in options:
                raise TypeError(f"pass {name}= or Petals' {petals_name}=, not both")
            options[name] = options.pop(petals_name)
    if options.get("show_route") == "inference":
        options["show_route"] = True
    unsupported = sorted(set(options) & set(PETALS_UNSUPPORTED))
    if unsupported:
        raise TypeError(
            "Petals client options corolla does not have: "
            + "; ".join(f"{name} ({PETALS_UNSUPPORTED[name]})" for name in unsupported)
        )
    known = {f.name for f in dataclasses.fields(ClientConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown client options: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return ClientConfig(**options)
