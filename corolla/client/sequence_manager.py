"""The client's view of the swarm: which servers serve which blocks, how fast, and whom to avoid.

``RemoteSequenceManager`` reads ServerInfo records through a :class:`~corolla.swarm.discovery.Discovery`
(in the background, or at once when no route can be found), drops servers of another model or wire
version (saying why), measures round-trip times with pings over its
:class:`~corolla.swarm.transport.Transport`, and plans routes with :mod:`corolla.client.routing`, skipping
the servers its :class:`~corolla.client.failure_policy.FailurePolicy` bans. It is the swarm's
:class:`~corolla.client.chain.RemoteChain`: ``forward`` runs whole sequences through the chain
(:mod:`corolla.client.remote_autograd`) and ``open_session`` returns an
:class:`~corolla.client.inference_session.InferenceSession`.

The network is two seams: ``from_pretrained_args`` joins the real swarm (a libp2p daemon and a DHT node
on the client's network thread); unit tests pass :mod:`corolla.swarm.memory`'s in-process transport and
discovery over real server handlers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import torch

from corolla.client.active_adapter import current_adapter
from corolla.client.chain import NO_EXTRAS, ChainExtras, RemoteChain, RouteHop
from corolla.client.config import ClientConfig, client_config
from corolla.client.failure_policy import FailurePolicy
from corolla.client.routing import Hop, format_route, plan_max_throughput, plan_min_latency, uncovered_blocks
from corolla.swarm.bridge import LoopThread
from corolla.swarm.discovery import DHTDiscovery, Discovery
from corolla.swarm.node import NetworkConfig, SwarmNode
from corolla.swarm.spans import RemoteSpanInfo, compute_spans
from corolla.swarm.transport import P2PTransport, Transport
from corolla.swarm.trust import swarm_key_path
from corolla.wire.errors import MissingBlocksError, UnknownAdapterError
from corolla.wire.messages import ModelRef, PingRequest, PingResponse
from corolla.wire.records import WIRE_VERSION

logger = logging.getLogger(__name__)

#: client settings that AutoDistributedConfig (Petals) puts on a model config; not part of the model's identity
CLIENT_CONFIG_KEYS = frozenset({f.name for f in dataclasses.fields(ClientConfig)} | {"active_adapter"})

#: How a route is planned: the fastest chain for one token (inference), or load spread over replicas
#: for batch forward/backward.
RouteMode = Literal["min_latency", "max_throughput"]


class RemoteSequenceManager(RemoteChain):
    def __init__(
        self,
        config: ClientConfig,
        model: ModelRef | Sequence[str] | None = None,
        num_blocks: int | None = None,
        transport: Transport | None = None,
        discovery: Discovery | None = None,
        bridge: LoopThread | None = None,
        on_shutdown: Callable[[], Awaitable[None]] | None = None,
        *,
        dht=None,
        state=None,
    ):
        """A manager over the given parts (``config`` a `ClientConfig`; unit tests pass in-memory seams), or
        Petals' form ``RemoteSequenceManager(config, block_uids=None, *, dht=None)``: ``config`` from
        `AutoDistributedConfig`, ``block_uids`` the uids ``f"{dht_prefix}.{i}"`` of every block (None: all),
        ``dht`` a hivemind `DHT` whose addresses are used as initial peers; it joins the swarm as
        `from_pretrained_args` does (see `corolla.client.distributed_config.petals_manager_args`)."""
        for name in ("rpc_info", "get_request_metadata"):
            if hasattr(type(self), name):  # a Petals subclass overriding its hivemind RPC hooks
                raise NotImplementedError(
                    f"{type(self).__name__}.{name} would be ignored: corolla has no hivemind RPC schema or "
                    "request metadata (use ClientConfig.activation_compression for lossy activations)"
                )
        if not isinstance(config, ClientConfig):
            from corolla.client.distributed_config import petals_manager_args

            parts = _swarm_parts(**petals_manager_args(config, model, dht=dht, state=state))
            config, model, num_blocks, transport, discovery, bridge, on_shutdown = parts
        elif dht is not None or state is not None:
            raise TypeError("dht= and state= are for Petals' form RemoteSequenceManager(config, block_uids, dht=)")
        self.config, self.model, self.num_blocks = config, model, num_blocks
        self.transport, self.discovery, self.bridge = transport, discovery, bridge
        self._on_shutdown = on_shutdown
        #: set once the swarm has been read (Petals' `sequence_manager.ready`)
        self.ready = threading.Event()
        self.spans: dict[str, RemoteSpanInfo] = {}
        self.refused: dict[str, str] = {}  # peer -> why we do not use it
        #: records the DHT gave us that were ignored as invalid, by reason (forged, expired, not_sealed, ...)
        self.ignored_records: dict[str, int] = {}
        self.rtts: dict[str, float] = {}
        self.policy = FailurePolicy(config, on_ban=lambda peer: self.rtts.pop(peer, None))
        self._last_seen: dict[str, float] = {}
        self._updated_at = -math.inf
        self._update_lock = asyncio.Lock()
        self._shut_down = False
        self._refresher = asyncio.run_coroutine_threadsafe(self.refresh_forever(), bridge.loop)

    @classmethod
    def from_pretrained_args(
        cls, *, model_ref: str, config: Any, initial_peers=None, dht_prefix: str | None = None, **options: Any
    ) -> RemoteSequenceManager:
        """Join the swarm serving ``model_ref`` (whose model ``config`` gives the config hash)."""
        return cls(*_swarm_parts(model_ref, config, initial_peers, dht_prefix, options))

    # --- swarm state -------------------------------------------------------------------------------

    async def update(self, force: bool = False) -> None:
        """Re-read the DHT (at most every ``update_period`` unless forced).

        A DHT lookup can miss records when some DHT peers are slow or gone, so a server that was usable
        and is simply absent from this lookup is kept for ``keep_absent`` seconds; a server whose record
        is present but says offline, or whose model differs, is dropped at once.
        """
        async with self._update_lock:
            if not force and time.monotonic() - self._updated_at < self.config.update_period:
                return
            infos = await self.discovery.block_infos(self.model.dht_prefix, self.num_blocks)
            self._report_ignored()
            now = time.monotonic()
            seen = {peer for servers in infos for peer in servers}
            usable = {}
            for peer, span in compute_spans(infos).items():
                reason = self._refusal(span)
                if reason is None:
                    usable[peer] = span
                elif self.refused.get(peer) != reason:
                    logger.warning("Not using server %s: %s", peer, reason)
                    self.refused[peer] = reason
            for peer in seen:
                self._last_seen[peer] = now
            for peer, span in self.spans.items():
                if peer not in seen and now - self._last_seen.get(peer, now) < self.config.keep_absent:
                    usable[peer] = span
            self.spans = usable
            self._updated_at = now
            self.ready.set()

    def _report_ignored(self) -> None:
        """Say when the DHT gave us records we ignored as invalid (forged, replayed, not sealed with the key)."""
        ignored = self.discovery.rejected()
        new = {reason: n - self.ignored_records.get(reason, 0) for reason, n in ignored.items()}
        new = {reason: n for reason, n in new.items() if n > 0}
        if new:
            logger.warning(
                "Ignored %d invalid record(s) in the DHT (%s): another peer announcing in a server's name, a replayed "
                "or outliving record, or one not sealed with this swarm's key",
                sum(new.values()), ", ".join(f"{reason} {n}" for reason, n in sorted(new.items())),
            )  # fmt: skip
        self.ignored_records = ignored

    async def refresh_forever(self) -> None:
        """Keep the swarm view fresh in the background, so that routing never waits on the DHT."""
        while True:
            await asyncio.sleep(self.config.update_period)
            try:
                await self.update(force=True)
            except Exception as e:  # a DHT hiccup must not end the refresher
                logger.debug("Background DHT refresh failed: %r", e)

    def _refusal(self, span: RemoteSpanInfo) -> str | None:
        if self.config.allowed_servers is not None and span.peer_id not in self.config.allowed_servers:
            return "it is not in allowed_servers"
        if span.peer_id in self.config.blocked_servers:
            return "it is in blocked_servers"
        if span.info.wire_version != WIRE_VERSION:
            return f"it speaks wire version {span.info.wire_version}, this client speaks {WIRE_VERSION}"
        if self.config.require_full_precision and span.info.quantization != "none":
            return f"it hosts {span.info.quantization}-quantized weights and require_full_precision is set"
        if span.info.config_hash != self.model.config_hash:
            return (
                f"its model config hash {span.info.config_hash[:12]} differs from this client's "
                f"{self.model.config_hash[:12]} (a different model under the same name)"
            )
        return None

    async def ping(self, peer: str, timeout: float | None = None) -> float | None:
        """Round-trip time to ``peer`` in seconds, or None if it did not answer in time."""
        t0 = time.perf_counter()
        try:
            await self.transport.call(peer, PingRequest(), PingResponse, timeout or self.config.ping_timeout)
        except Exception as e:  # dial failure, EOF, timeout: all mean "not answering"
            logger.debug("Ping to %s failed: %r", peer, e)
            return None
        return time.perf_counter() - t0

    async def _measure_rtts(self, peers: list[str]) -> None:
        todo = [p for p in peers if p not in self.rtts]
        results = await asyncio.gather(*(self.ping(p) for p in todo))
        for peer, rtt in zip(todo, results):
            if rtt is None:
                self.policy.ban(peer, "did not answer a ping")
            else:
                self.rtts[peer] = rtt

    # --- routing -----------------------------------------------------------------------------------

    def _candidates(self, adapter: str | None, min_free_cache: int) -> list[RemoteSpanInfo]:
        """Usable spans for a request: not banned, serving ``adapter``, with room for its cache."""
        return [
            s
            for s in self.spans.values()
            if not self.policy.is_banned(s.peer_id)
            and (adapter is None or adapter in s.info.adapters)
            and (min_free_cache <= 0 or s.info.free_cache_tokens >= min_free_cache)
        ]

    async def make_route(
        self,
        start: int,
        end: int,
        *,
        mode: RouteMode = "min_latency",
        adapter: str | None = None,
        min_free_cache: int = 0,
    ) -> list[Hop]:
        """A chain over [start, end), waiting (bounded) for blocks nobody usable serves.

        ``mode`` picks the planner (see :mod:`corolla.client.routing`). Only servers that announce
        ``adapter`` (when given) and at least ``min_free_cache`` free cache tokens per block are used;
        when the free-cache filter alone leaves a block uncovered it is relaxed (the server then makes
        the session wait for cache, bounded, rather than the client failing at once).
        """
        deadline = time.monotonic() + self.config.missing_blocks_timeout
        backoff = self.config.min_backoff
        force = not self.spans
        while True:
            if force:
                await self.update(force=True)
            await self._measure_rtts([s.peer_id for s in self._candidates(adapter, 0)])
            usable = self._candidates(adapter, min_free_cache)
            if min_free_cache > 0 and uncovered_blocks(usable, start, end):
                usable = self._candidates(adapter, 0)
            if mode == "max_throughput":
                route = plan_max_throughput(usable, start, end, self.rtts)
            else:
                route = plan_min_latency(usable, start, end, self.rtts, push=self.config.push)
            if route is not None:
                log = logger.info if self.config.show_route else logger.debug
                log("Route for blocks [%d, %d) (%s): %s", start, end, mode, format_route(route, self._names()))
                return route
            missing = uncovered_blocks(usable, start, end)
            if adapter is not None and self.spans and not self._anyone_serves(adapter):
                if not force:  # re-read the DHT once before saying nobody serves it
                    force = True
                    continue
                served = sorted({a for s in self.spans.values() for a in s.info.adapters})
                raise UnknownAdapterError(
                    f"no server of {self.model.dht_prefix!r} serves adapter {adapter!r} "
                    f"(adapters served: {', '.join(map(repr, served)) or 'none'})"
                )
            if await self._unban_live_servers_of(missing):
                continue  # a banned server is the only one left for some blocks, and it answers again
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why = self._why()
                if adapter is not None:
                    why = "; ".join(filter(None, [why, f"only servers announcing adapter {adapter!r} are used"]))
                raise MissingBlocksError(missing, self.model.dht_prefix, self.config.missing_blocks_timeout, why)
            banned = sorted(p for p in self.spans if self.policy.is_banned(p))
            logger.warning(
                "No usable server for blocks %s (%d banned); retrying in %.1f s", missing, len(banned), backoff
            )
            await asyncio.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, self.config.max_backoff)
            force = True

    async def _unban_live_servers_of(self, blocks: list[int]) -> bool:
        """Ping banned servers that host any of ``blocks``; lift the ban of those that answer."""
        candidates = [
            p
            for p, s in self.spans.items()
            if self.policy.is_banned(p) and any(s.start <= b < s.end for b in blocks)
        ]
        rtts = await asyncio.gather(*(self.ping(p) for p in candidates))
        lifted = False
        for peer, rtt in zip(candidates, rtts):
            if rtt is not None:
                self.policy.lift_ban(peer)
                self.rtts[peer] = rtt
                logger.info("Server %s answers again and is the only one left for some blocks: retrying it", peer)
                lifted = True
        return lifted

    def _anyone_serves(self, adapter: str) -> bool:
        return any(adapter in s.info.adapters for s in self.spans.values())

    def _names(self) -> dict[str, str]:
        return {p: s.info.public_name for p, s in self.spans.items() if s.info.public_name}

    def _why(self) -> str:
        reasons = [f"server {p}: {r}" for p, r in self.refused.items()]
        banned = [p for p in self.spans if self.policy.is_banned(p)]
        if banned:
            reasons.append(f"{len(banned)} server(s) failed recently and are avoided")
        return "; ".join(reasons)

    def show_route(self, start: int = 0, end: int | None = None) -> str:
        """The chain a new inference session would use now, as text (also logged)."""
        route = self.bridge.run(self.make_route(start, self.num_blocks if end is None else end))
        text = format_route(route, self._names())
        logger.info("Route: %s", text)
        return text

    def route_hops(self, route: list[Hop]) -> list[RouteHop]:
        names = self._names()
        return [RouteHop(h.peer_id, names.get(h.peer_id, h.peer_id[-8:]), h.start, h.end) for h in route]

    # --- the chain ---------------------------------------------------------------------------------

    def forward(
        self, hidden, positions, attention_mask, start: int = 0, end: int | None = None, *,
        prompts: torch.Tensor | None = None, extras: ChainExtras = NO_EXTRAS,
    ) -> torch.Tensor:  # fmt: skip
        """Blocks [start, end) over whole sequences (see :mod:`corolla.client.remote_autograd`)."""
        from corolla.client.remote_autograd import remote_forward

        end = self.num_blocks if end is None else end
        return remote_forward(self, hidden, positions, attention_mask, start, end, prompts, extras)

    def open_session(
        self, max_length: int, *, adapter: str | None = None, prompts: torch.Tensor | None = None,
        extras: ChainExtras = NO_EXTRAS, blocks: tuple[int, int] | None = None,
    ):  # fmt: skip
        from corolla.client.inference_session import InferenceSession

        return InferenceSession(self, max_length, adapter=adapter, prompts=prompts, extras=extras, blocks=blocks)

    def served_adapter(self, adapter: str | None = None) -> str | None:
        """The served adapter a request started now uses (see :mod:`corolla.client.active_adapter`)."""
        return adapter or current_adapter(self.config.active_adapter)

    # --- Petals' names --------------------------------------------------------------------------------

    def make_sequence(
        self, start_index: int = 0, end_index: int | None = None, *, mode: RouteMode,
        cache_tokens_needed: int | None = None,
    ) -> list[Hop]:  # fmt: skip
        """Petals' name for planning a route over blocks [start_index, end_index): the hops (peer_id, start,
        end) that `make_route` gives, for ``mode`` "min_latency" or "max_throughput"."""
        if mode not in ("min_latency", "max_throughput"):
            raise ValueError(f"mode must be 'min_latency' or 'max_throughput', got {mode!r}")
        end = self.num_blocks if end_index is None else end_index
        return self.bridge.run(
            self.make_route(start_index, end, mode=mode, min_free_cache=cache_tokens_needed or 0)
        )

    def is_alive(self) -> bool:
        """Whether the background refresher runs (until `shutdown`)."""
        return not self._refresher.done()

    @property
    def _thread(self) -> RemoteSequenceManager:
        """Petals' refresher thread, which scripts read `ready` and `is_alive()` of: here the manager itself."""
        return self

    def __len__(self) -> int:
        return self.num_blocks

    def shutdown(self) -> None:
        """Leave the swarm (stop the refresher, the DHT node, the daemon and the network thread); idempotent."""
        if getattr(self, "_shut_down", True):  # already shut down, or never fully built
            return
        self._shut_down = True
        self._refresher.cancel()
        try:
            if self._on_shutdown is not None:
                self.bridge.run(self._on_shutdown(), timeout=10)
        finally:
            self.bridge.shutdown()


def _swarm_parts(model_ref: str, config: Any, initial_peers, dht_prefix: str | None, options: dict) -> tuple:
    """A client's network (a libp2p daemon and a DHT node on a new network thread) and what the manager of
    ``model_ref`` needs: (ClientConfig, ModelRef, number of blocks, transport, discovery, bridge, on_shutdown)."""
    from corolla.models.checkpoint import config_hash, default_dht_prefix

    cfg = client_config(initial_peers=tuple(initial_peers or ()), dht_prefix=dht_prefix, **options)
    # the model's identity, without the client settings a config may carry (AutoDistributedConfig)
    served = {k: v for k, v in config.to_dict().items() if k not in CLIENT_CONFIG_KEYS}
    model = ModelRef(dht_prefix or default_dht_prefix(model_ref), config_hash(served))
    network = NetworkConfig(
        initial_peers=cfg.initial_peers,
        host_maddrs=cfg.host_maddrs,
        client_mode=True,
        nat_port_map=False,
        swarm_key=swarm_key_path(cfg.swarm_key),
    )
    bridge = LoopThread()
    try:
        node = bridge.run(SwarmNode.start(network))
    except BaseException:
        bridge.shutdown()
        raise
    return (
        cfg, model, config.num_hidden_layers, P2PTransport(node.p2p, node.trust.member_proof()),
        DHTDiscovery(node.records), bridge, node.shutdown,
    )  # fmt: skip
