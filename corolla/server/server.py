"""A server's lifecycle: join the swarm, choose and load blocks, measure, announce, serve, leave.

``Server.run`` is the whole life of one server as a sequence of steps, each a small method. States
announced in the DHT follow it: JOINING while weights load, ONLINE while serving, OFFLINE on a clean
exit (SIGINT/SIGTERM: in-flight steps finish, new ones are refused, then the records say offline).
A server that dies otherwise stops refreshing its records, which lapse after ``record_expiration``;
its ``p2pd`` dies with it (see :mod:`corolla.swarm.reaper`), so it is never left reachable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import torch

from corolla import __version__
from corolla.models.checkpoint import Checkpoint, config_hash, default_dht_prefix
from corolla.models.stack import BlockStack
from corolla.server.backend import BlockBackend
from corolla.server.block_selection import choose_best_start
from corolla.server.compute import ComputeWorker
from corolla.server.config import ServerConfig
from corolla.server.handlers import RequestHandler
from corolla.server.memory_cache import MemoryCache
from corolla.swarm.discovery import announce, fetch_block_infos
from corolla.swarm.node import SwarmNode
from corolla.swarm.spans import servers_per_block
from corolla.swarm.transport import PROTOCOL
from corolla.wire.messages import ModelRef
from corolla.wire.records import ServerInfo, ServerState
from corolla.wire.tensors import DTYPES, dtype_name

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.node: SwarmNode | None = None
        self.handler: RequestHandler | None = None
        self.info: ServerInfo | None = None

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        model_config = Checkpoint(cfg.model, revision=cfg.revision, token=cfg.token).config
        self.dht_prefix = cfg.dht_prefix or default_dht_prefix(cfg.model)
        self.model_ref = ModelRef(self.dht_prefix, config_hash(model_config))
        dtype = resolve_dtype(cfg.torch_dtype, model_config)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.node = await SwarmNode.start(cfg.network)
        try:
            start, end = await self._choose_blocks(model_config.num_hidden_layers)
            self.info = self._make_info(ServerState.JOINING, start, end, dtype)
            await self._announce()
            worker = ComputeWorker()
            try:
                stack = await self._load(start, end, dtype)
                backend = BlockBackend(stack, worker)
                memory = MemoryCache(cfg.cache.attn_cache_tokens * (end - start), cfg.cache.max_alloc_timeout)
                latency = await self._measure_latency(backend)
                self.info = self._make_info(ServerState.ONLINE, start, end, dtype, latency)
                self.handler = RequestHandler(
                    backend, memory, self.model_ref, lambda: self._current_info(memory),
                    inference_max_length=cfg.inference_max_length, max_batch_size=cfg.max_batch_size,
                    request_timeout=cfg.request_timeout, session_timeout=cfg.session_timeout,
                    max_message_bytes=cfg.max_message_bytes,
                )  # fmt: skip
                await self.node.p2p.add_binary_stream_handler(PROTOCOL, self.handler)
                await self._serve_until(stop, memory)
                await self._leave()
            finally:
                worker.shutdown()
        finally:
            await self.node.shutdown()
            logger.info("Server stopped")

    async def _choose_blocks(self, total: int) -> tuple[int, int]:
        cfg = self.config
        if cfg.block_indices is not None:
            start, end = cfg.block_indices
            if end > total:
                raise ValueError(f"--block_indices {start}:{end} is past the model's {total} blocks")
            logger.info("Hosting blocks [%d, %d) as told by --block_indices", start, end)
            return start, end
        if cfg.num_blocks is None:
            logger.info("Hosting all %d blocks (neither --num_blocks nor --block_indices given)", total)
            return 0, total
        if cfg.num_blocks > total:
            raise ValueError(f"--num_blocks {cfg.num_blocks} is more than the model's {total} blocks")
        infos = await fetch_block_infos(self.node.dht, self.dht_prefix, total)
        counts = servers_per_block(infos, (ServerState.JOINING, ServerState.ONLINE))
        start = choose_best_start(counts, cfg.num_blocks)
        logger.info(
            "Hosting blocks [%d, %d): the first span of %d blocks with the fewest servers (servers per block: %s)",
            start, start + cfg.num_blocks, cfg.num_blocks, counts,
        )  # fmt: skip
        return start, start + cfg.num_blocks

    async def _load(self, start: int, end: int, dtype: torch.dtype) -> BlockStack:
        cfg = self.config
        logger.info(
            "Loading blocks [%d, %d) of %s in %s on %s", start, end, cfg.model, dtype_name(dtype), cfg.device
        )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None,
            lambda: BlockStack.load(
                cfg.model, start, end, dtype=dtype, device=cfg.device, revision=cfg.revision, token=cfg.token
            ),
        )

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

    def _make_info(self, state: ServerState, start: int, end: int, dtype: torch.dtype, latency: float = 0.0):
        cfg = self.config
        return ServerInfo(
            state=state, start=start, end=end, public_name=cfg.public_name,
            throughput=1.0 / latency if latency > 0 else 0.0, inference_latency=latency,
            free_cache_tokens=cfg.cache.attn_cache_tokens, inference_max_length=cfg.inference_max_length,
            max_batch_size=cfg.max_batch_size, torch_dtype=dtype_name(dtype),
            software_version=__version__, config_hash=self.model_ref.config_hash,
        )  # fmt: skip

    def _current_info(self, memory: MemoryCache) -> ServerInfo:
        assert self.info is not None
        blocks = self.info.end - self.info.start
        return dataclasses.replace(self.info, free_cache_tokens=memory.free // max(blocks, 1))

    async def _announce(self) -> None:
        assert self.info is not None and self.node is not None
        blocks = range(self.info.start, self.info.end)
        await announce(
            self.node.dht,
            self.dht_prefix,
            self.node.peer_id.to_base58(),
            blocks,
            self.info,
            self.config.record_expiration,
        )

    async def _serve_until(self, stop: asyncio.Event, memory: MemoryCache) -> None:
        assert self.info is not None
        self.info = self._current_info(memory)
        await self._announce()
        logger.info(
            "Serving blocks [%d, %d) of %s as %s",
            self.info.start,
            self.info.end,
            self.dht_prefix,
            self.node.peer_id,
        )
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.config.update_period)
            except asyncio.TimeoutError:
                self.info = self._current_info(memory)
                await self._announce()

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


def resolve_dtype(name: str, model_config) -> torch.dtype:
    if name != "auto":
        if name not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--torch_dtype must be auto, float32, bfloat16 or float16, got {name!r}")
        return DTYPES[name]
    declared = getattr(model_config, "dtype", None)
    if isinstance(declared, str):
        declared = DTYPES.get(declared)
    return declared if declared in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
