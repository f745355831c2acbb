"""A server's lifecycle: join the swarm, choose and load blocks, measure, announce, serve, move, leave.

``Server.run`` is the whole life of one server as a sequence of steps, each a small method. States
announced in the DHT follow it: JOINING while weights load, ONLINE while serving, OFFLINE on a clean
exit (SIGINT/SIGTERM: in-flight steps finish, new ones are refused, then the records say offline).
A server that dies otherwise stops refreshing its records, which lapse after ``record_expiration``;
its ``p2pd`` dies with it (see :mod:`corolla.swarm.reaper`), so it is never left reachable.

Unless its blocks were pinned with ``--block_indices``, a server re-checks the swarm every
``balance_period`` seconds (jittered) and moves when :func:`~corolla.server.block_selection.rebalance_target`
says that raises the swarm's bottleneck: it announces JOINING on the new blocks and OFFLINE on the old
ones, drains its sessions (their clients fail over), frees the old blocks, loads the new ones and goes
ONLINE again. A decision is confirmed by a second look after a random pause, so that two servers that
decide at once do not both move.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time

import torch

from corolla import __version__
from corolla.models.checkpoint import Checkpoint, config_hash, default_dht_prefix
from corolla.models.quant import quantize_stack
from corolla.models.stack import BlockStack
from corolla.server.adapters import AdapterStore, check_served_adapters, load_served_adapter, parse_adapter_spec
from corolla.server.backend import BlockBackend
from corolla.server.compute import ComputeWorker
from corolla.server.config import ServerConfig
from corolla.server.handlers import RequestHandler
from corolla.server.memory_cache import MemoryCache
from corolla.server.placement import Placement
from corolla.server.throughput import (
    ComputeThroughput,
    announced_throughput,
    compute_throughput,
    measure_rtts,
    network_tokens_per_second,
    probe_bandwidth,
)
from corolla.swarm.node import SwarmNode
from corolla.swarm.transport import PROTOCOL, P2PTransport
from corolla.wire.messages import ModelRef
from corolla.wire.records import ModelRecord, ServerInfo, ServerState
from corolla.wire.tensors import DTYPES, dtype_name

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.node: SwarmNode | None = None
        self.handler: RequestHandler | None = None
        self.info: ServerInfo | None = None
        self.compute: ComputeThroughput | None = None
        self.network_throughput: float | None = None
        self.next_rtts: tuple[tuple[str, float], ...] = ()
        self.worker: ComputeWorker | None = None
        #: one-token steps of 16 sessions batched vs one at a time: tokens/s ratio measured at start (1 = off)
        self.batch_speedup = 1.0
        self.batch_sessions = 0.0  # sessions per batch since the last announcement
        self.adapter_names = tuple(sorted(parse_adapter_spec(spec)[0] for spec in config.adapters))

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        model_config = Checkpoint(cfg.model, revision=cfg.revision, token=cfg.token).config
        self.model_config = model_config
        self.num_model_blocks = model_config.num_hidden_layers
        self.dht_prefix = cfg.dht_prefix or default_dht_prefix(cfg.model)
        self.model_ref = ModelRef(self.dht_prefix, config_hash(model_config))
        self.dtype = dtype = resolve_dtype(cfg.torch_dtype, model_config)
        check_served_adapters(cfg.adapters, model_config, token=cfg.token)  # before anything slow
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.node = await SwarmNode.start(cfg.network)
        #: streams to other servers (pushes, probes, pings), with our membership proof in a private swarm
        self.transport = P2PTransport(self.node.p2p, self.node.trust.member_proof())
        try:
            # one stream handler for the server's whole life; it serves through whichever span is loaded
            await self.node.p2p.add_binary_stream_handler(PROTOCOL, self._dispatch)
            loop = asyncio.get_running_loop()
            self.compute = await loop.run_in_executor(
                None,
                lambda: compute_throughput(
                    cfg.throughput, model_config, self.model_ref.config_hash, dtype=dtype, device=cfg.device
                ),
            )
            self.placement = Placement(
                cfg, self.node.records, peer_id=self.peer_id, dht_prefix=self.dht_prefix,
                config_hash=self.model_ref.config_hash, model_config=model_config, dtype=dtype,
            )  # fmt: skip
            await self._measure_network()
            start, end = await self.placement.choose_blocks(self.num_model_blocks)
            while start is not None and not stop.is_set():
                start, end = await self._serve_span(start, end, stop)
        finally:
            await self.node.shutdown()
            logger.info("Server stopped")

    @property
    def peer_id(self) -> str:
        return self.node.peer_id.to_base58()

    async def _dispatch(self, stream_info, reader, writer) -> None:
        handler = self.handler
        if handler is None:  # between spans while moving: the caller sees EOF and goes elsewhere
            writer.close()
            return
        await handler(stream_info, reader, writer)

    async def _serve_span(self, start: int, end: int, stop: asyncio.Event) -> tuple[int | None, int | None]:
        """Host [start, end) until told to stop (returns (None, None)) or until a move (returns the new span)."""
        cfg = self.config
        self.info = self._make_info(ServerState.JOINING, start, end)
        await self._announce()
        worker = self.worker = ComputeWorker(
            batching=cfg.batching,
            max_batch_tokens=cfg.max_batch_tokens,
            max_client_jobs=cfg.limits.max_client_jobs,
        )
        try:
            stack = await self._load(start, end, self.dtype)
            adapters = await self._load_adapters(stack)
            backend = BlockBackend(stack, worker)
            memory = MemoryCache(
                cfg.cache.attn_cache_tokens * (end - start), cfg.cache.max_alloc_timeout,
                max_client_share=cfg.limits.max_client_cache_share,
            )  # fmt: skip
            latency = await self._measure_latency(backend)
            if cfg.batching:
                self.batch_speedup = await self._measure_batching(backend, latency)
            self.info = self._make_info(ServerState.ONLINE, start, end, latency)
            self.handler = RequestHandler(
                backend, memory, self.model_ref, lambda: self._current_info(memory),
                inference_max_length=cfg.inference_max_length, max_batch_size=cfg.max_batch_size,
                request_timeout=cfg.request_timeout, session_timeout=cfg.session_timeout, limits=cfg.limits,
                max_message_bytes=cfg.max_message_bytes, adapters=adapters, transport=self.transport, swarm_key=self.node.trust.swarm_key,
            )  # fmt: skip
            new_start = await self._serve_until(stop, memory)
            if new_start is None:
                await self._leave()
                return None, None
            await self._move_out(new_start, new_start + (end - start))
            return new_start, new_start + (end - start)
        finally:
            self.handler = None
            worker.shutdown()

    async def _load(self, start: int, end: int, dtype: torch.dtype) -> BlockStack:
        cfg = self.config
        logger.info(
            "Loading blocks [%d, %d) of %s in %s on %s", start, end, cfg.model, dtype_name(dtype), cfg.device
        )

        def load() -> BlockStack:
            stack = BlockStack.load(
                cfg.model, start, end, dtype=dtype, device=cfg.device, revision=cfg.revision, token=cfg.token
            )
            quantize_stack(stack, cfg.quant_type)  # "none": unchanged
            return stack

        return await asyncio.get_running_loop().run_in_executor(None, load)

    async def _measure_latency(self, backend: BlockBackend) -> float:
        """Seconds per token per block of a one-token inference step.

        The minimum of several runs: servers often start together and load weights at the same time,
        and a median taken under that contention would announce this server as slower than it is.
        """
        stack = backend.stack
        session = backend.open_session(stack.start, stack.end, 1, 8)
        hidden = torch.zeros(1, 1, backend.hidden_size)
        mask = torch.ones(1, 1, dtype=torch.bool)
        times = []
        for i in range(8):
            t0 = time.perf_counter()
            await backend.inference_step(session, i, hidden, torch.tensor([[i]]), mask)
            times.append(time.perf_counter() - t0)
        latency = min(times) / (stack.end - stack.start)
        logger.info("Measured %.2f ms per token per block for inference", latency * 1000)
        return latency

    async def _measure_batching(self, backend: BlockBackend, latency: float, sessions: int = 16) -> float:
        """How many times more tokens/s one-token steps of ``sessions`` concurrent sessions get batched than
        one at a time (``latency`` x blocks each); at least 1."""
        stack = backend.stack
        kvs = [backend.open_session(stack.start, stack.end, 1, 4) for _ in range(sessions)]
        hidden = torch.zeros(1, 1, backend.hidden_size)
        mask = torch.ones(1, 1, dtype=torch.bool)
        times = []
        for i in range(3):
            t0 = time.perf_counter()
            await asyncio.gather(*(backend.inference_step(kv, i, hidden, torch.tensor([[i]]), mask) for kv in kvs))
            times.append(time.perf_counter() - t0)
        speedup = max(1.0, sessions * latency * (stack.end - stack.start) / min(times))
        logger.info("Measured %.1fx the tokens/s with %d sessions batched", speedup, sessions)
        return speedup

    async def _load_adapters(self, stack: BlockStack) -> AdapterStore:
        """The served adapters (checked against the model; a bad one stops the server) and client uploads."""
        cfg = self.config

        def load() -> AdapterStore:
            served = {}
            for spec in cfg.adapters:
                name, ref = parse_adapter_spec(spec)
                served[name] = adapter = load_served_adapter(ref, stack, token=cfg.token)
                logger.info(
                    "Serving adapter %r from %s: r=%d, alpha=%g, targets %s, %d of blocks [%d, %d)",
                    name, ref, adapter.r, adapter.alpha, ",".join(adapter.target_modules), len(adapter.weights),
                    stack.start, stack.end,
                )  # fmt: skip
            return AdapterStore(
                stack, served, max_client_bytes=cfg.max_client_adapter_bytes, client_ttl=cfg.client_adapter_ttl
            )

        return await asyncio.get_running_loop().run_in_executor(None, load)

    def _make_info(self, state: ServerState, start: int, end: int, latency: float = 0.0) -> ServerInfo:
        cfg = self.config
        compute = self.compute
        if latency > 0:  # the real blocks' measurement beats the random block's
            compute = ComputeThroughput(inference=self.batch_speedup / latency, forward=compute.forward)
        return ServerInfo(
            state=state, start=start, end=end, public_name=cfg.public_name,
            throughput=announced_throughput(compute, self.network_throughput),
            inference_latency=latency or 1.0 / compute.inference,
            free_cache_tokens=cfg.cache.attn_cache_tokens, inference_max_length=cfg.inference_max_length,
            max_batch_size=cfg.max_batch_size, torch_dtype=dtype_name(self.dtype), quantization=cfg.quant_type,
            software_version=__version__, config_hash=self.model_ref.config_hash,
            next_rtts=self.next_rtts, forward_throughput=compute.forward,
            network_throughput=self.network_throughput or 0.0, adapters=self.adapter_names,
        )  # fmt: skip

    def _current_info(self, memory: MemoryCache) -> ServerInfo:
        assert self.info is not None
        blocks = self.info.end - self.info.start
        return dataclasses.replace(
            self.info, free_cache_tokens=memory.free // max(blocks, 1), next_rtts=self.next_rtts,
            batch_sessions=self.batch_sessions,
        )  # fmt: skip

    async def _announce(self, info: ServerInfo | None = None) -> None:
        info = info or self.info
        assert info is not None and self.node is not None
        await self.node.records.announce(
            self.dht_prefix, range(info.start, info.end), info, self.config.record_expiration
        )
        if info.state != ServerState.OFFLINE:
            record = ModelRecord(
                self.dht_prefix, self.num_model_blocks, self.model_ref.config_hash, self.model_config.model_type
            )
            await self.node.records.announce_model(record, self.config.record_expiration)

    async def _measure_network(self) -> None:
        """Bandwidth to up to three other servers of this model (never anything outside the swarm)."""
        try:
            spans = await self.placement.swarm_spans((ServerState.ONLINE,))
        except Exception as e:
            logger.warning("Could not read the DHT to measure the network: %r", e)
            spans = {}
        peers = [p for p in spans if p != self.peer_id][:3]
        if not peers:
            logger.info("No other server to measure bandwidth against: announcing compute throughput only")
            return
        best = await probe_bandwidth(self.transport, peers)
        if best > 0:
            self.network_throughput = network_tokens_per_second(best, self.model_config.hidden_size, self.dtype)
            logger.info(
                "Measured %.0f Mbit/s to other servers: %.0f tokens/s of hidden states",
                best * 8 / 1e6, self.network_throughput,
            )  # fmt: skip

    async def _measure_next_rtts(self) -> None:
        """RTTs to the servers hosting the block after ours (announced for routing and the dashboard)."""
        assert self.info is not None
        if self.info.end >= self.num_model_blocks:
            self.next_rtts = ()
            return
        spans = await self.placement.swarm_spans((ServerState.ONLINE,))
        peers = sorted(p for p, s in spans.items() if s.start <= self.info.end < s.end and p != self.peer_id)[:5]
        self.next_rtts = await measure_rtts(self.transport, peers)

    async def _serve_until(self, stop: asyncio.Event, memory: MemoryCache) -> int | None:
        """Serve, announcing every ``update_period``; returns a new start if the server should move."""
        assert self.info is not None
        cfg = self.config
        self.info = self._current_info(memory)
        await self._announce()
        logger.info(
            "Serving blocks [%d, %d) of %s as %s", self.info.start, self.info.end, self.dht_prefix, self.peer_id
        )
        rebalance = cfg.block_indices is None and cfg.balance_period > 0
        next_check = time.monotonic() + _jitter(cfg.balance_period)
        next_announce = time.monotonic() + cfg.update_period
        while not stop.is_set():
            now = time.monotonic()
            wake = min(next_announce, next_check) if rebalance else next_announce
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, wake - now))
                return None
            except asyncio.TimeoutError:
                pass
            if time.monotonic() >= next_announce:
                next_announce = time.monotonic() + cfg.update_period
                try:
                    await self._measure_next_rtts()
                except Exception as e:
                    logger.debug("Measuring RTTs to the next servers failed: %r", e)
                if self.worker is not None:
                    self.batch_sessions = self.worker.take_stats().mean_sessions
                self.info = self._current_info(memory)
                await self._announce()
            if rebalance and time.monotonic() >= next_check:
                next_check = time.monotonic() + _jitter(cfg.balance_period)
                try:
                    target = await self.placement.rebalance_target(self.info, stop)
                except Exception as e:
                    logger.warning("Rebalancing check failed: %r", e)
                    target = None
                if target is not None:
                    return target
        return None

    async def _move_out(self, new_start: int, new_end: int) -> None:
        """Announce the new blocks as joining and the old as offline, then drain the old blocks' sessions."""
        assert self.info is not None and self.handler is not None
        old = self.info
        await self._announce(self._make_info(ServerState.JOINING, new_start, new_end))
        self.info = dataclasses.replace(old, state=ServerState.OFFLINE)
        await self._announce()
        await self.handler.drain(SHUTDOWN_GRACE)
        logger.info("Left blocks [%d, %d); their sessions were drained or handed to failover", old.start, old.end)

    async def _leave(self) -> None:
        assert self.info is not None and self.handler is not None
        logger.info("Shutting down: announcing offline, finishing in-flight steps")
        self.info = dataclasses.replace(self.info, state=ServerState.OFFLINE)
        drain = asyncio.create_task(self.handler.drain(SHUTDOWN_GRACE))
        if not self.node.daemon_alive():
            logger.warning(
                "p2pd has already stopped (a terminal Ctrl-C reaches it too); our records expire in %.0f s",
                self.config.record_expiration,
            )
            await drain
            return
        try:
            await asyncio.wait_for(self._announce(), SHUTDOWN_GRACE)
        except (asyncio.TimeoutError, OSError) as e:  # e.g. Ctrl-C in a terminal also stopped p2pd
            logger.warning("Could not announce offline (%r); the records will expire", e)
        await drain


def _jitter(period: float) -> float:
    return period * random.uniform(0.7, 1.3)


def resolve_dtype(name: str, model_config) -> torch.dtype:
    if name != "auto":
        if name not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--torch_dtype must be auto, float32, bfloat16 or float16, got {name!r}")
        return DTYPES[name]
    declared = getattr(model_config, "dtype", None)
    if isinstance(declared, str):
        declared = DTYPES.get(declared)
    return declared if declared in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
