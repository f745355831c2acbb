"""Where a server's blocks go: the swarm's spans as the server sees them, the first choice, and moves.

The decisions themselves are pure functions in :mod:`corolla.server.block_selection`; this class feeds
them what the DHT says (this model's joining and online servers, other than this one) and what fits in
this machine's memory, and logs why it chose what it chose.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random

import psutil
import torch

from corolla.models.quant import QUANT_BYTES_PER_WEIGHT
from corolla.models.registry import get_family
from corolla.server.block_selection import Span, block_throughputs, choose_best_start, quality, rebalance_target
from corolla.server.config import ServerConfig
from corolla.swarm.discovery import RecordStore
from corolla.swarm.spans import RemoteSpanInfo, compute_spans
from corolla.wire.records import ServerInfo, ServerState

logger = logging.getLogger(__name__)

#: Memory left for Python, torch, the network stack and activations when sizing --num_blocks from free memory.
MEMORY_RESERVE = 1.5 * 2**30


class Placement:
    """Block placement for one server of one model (``config_hash``) in the swarm whose records ``records`` reads."""

    def __init__(
        self,
        config: ServerConfig,
        records: RecordStore,
        *,
        peer_id: str,
        dht_prefix: str,
        config_hash: str,
        model_config,
        dtype,
    ):
        self.config, self.records, self.peer_id = config, records, peer_id
        self.dht_prefix, self.config_hash = dht_prefix, config_hash
        self.model_config, self.dtype = model_config, dtype
        self.num_model_blocks = model_config.num_hidden_layers

    async def swarm_spans(self, states=(ServerState.JOINING, ServerState.ONLINE)) -> dict[str, RemoteSpanInfo]:
        infos = await self.records.block_infos(self.dht_prefix, self.num_model_blocks)
        return {
            peer: span
            for peer, span in compute_spans(infos, states).items()
            if span.info.config_hash == self.config_hash
        }

    async def choose_blocks(self, total: int) -> tuple[int, int]:
        cfg = self.config
        if cfg.block_indices is not None:
            start, end = cfg.block_indices
            if end > total:
                raise ValueError(f"--block_indices {start}:{end} is past the model's {total} blocks")
            logger.info("Hosting blocks [%d, %d) as told by --block_indices (no rebalancing)", start, end)
            return start, end
        num_blocks = cfg.num_blocks
        if num_blocks is None:
            num_blocks = self.blocks_that_fit(total)
        elif num_blocks > total:
            raise ValueError(f"--num_blocks {num_blocks} is more than the model's {total} blocks")
        spans = await self.swarm_spans()
        spans.pop(self.peer_id, None)
        throughputs = block_throughputs(_selection_spans(spans), total)
        start = choose_best_start(throughputs, num_blocks)
        logger.info(
            "Hosting blocks [%d, %d): the weakest span of %d blocks (swarm tokens/s per block: %s)",
            start, start + num_blocks, num_blocks, [round(t, 1) for t in throughputs],
        )  # fmt: skip
        return start, start + num_blocks

    def blocks_that_fit(self, total: int) -> int:
        """How many blocks fit in free memory, each with its share of the KV-cache budget."""
        cfg = self.config
        family = get_family(self.model_config.model_type)
        spec = family.block_spec(self.model_config, 0)
        element = torch.empty((), dtype=self.dtype).element_size()
        weights = sum(math.prod(shape) for parts in family.weight_map(spec).values() for _, shape in parts)
        cache = cfg.cache.attn_cache_tokens * 2 * spec.num_kv_heads * spec.head_dim
        per_block = weights * QUANT_BYTES_PER_WEIGHT.get(cfg.quant_type, element) + cache * element
        if torch.device(cfg.device).type == "cuda":
            free = torch.cuda.mem_get_info(torch.device(cfg.device))[0]
        else:
            free = psutil.virtual_memory().available
        usable = max(0.0, free * 0.9 - MEMORY_RESERVE)
        fit = int(usable // per_block)
        num_blocks = max(1, min(total, fit))
        logger.info(
            "Hosting %d blocks: %.1f GiB free, %.1f MiB per block with its cache budget (weights + "
            "--attn_cache_tokens %d)%s",
            num_blocks, free / 2**30, per_block / 2**20, cfg.cache.attn_cache_tokens,
            "" if fit >= 1 else "; even one block may not fit",
        )  # fmt: skip
        return num_blocks

    async def rebalance_target(self, info: ServerInfo, stop: asyncio.Event) -> int | None:
        """Where to move, if moving raises the swarm's bottleneck enough; confirmed by a second look."""
        me = Span(self.peer_id, info.start, info.end, info.throughput or 1.0)

        async def target() -> tuple[int | None, list[Span]]:
            spans = await self.swarm_spans()
            spans.pop(self.peer_id, None)
            others = _selection_spans(spans)
            return rebalance_target([*others, me], me, self.num_model_blocks, self.config.balance_quality), others

        first, _ = await target()
        if first is None:
            return None
        try:  # a random pause, then look again: another server may be moving to the same place
            pause = random.uniform(0.2, 1.0) * min(self.config.balance_confirm, self.config.balance_period)
            await asyncio.wait_for(stop.wait(), pause)
            return None
        except asyncio.TimeoutError:
            pass
        second, others = await target()
        if second != first:
            logger.info("Not moving: the swarm changed while deciding")
            return None
        length = me.end - me.start
        (now_min, now_gaps) = quality(block_throughputs([*others, me], self.num_model_blocks))
        moved = Span(me.peer_id, first, first + length, me.throughput)
        (after_min, after_gaps) = quality(block_throughputs([*others, moved], self.num_model_blocks))
        logger.info(
            "Moving from blocks [%d, %d) to [%d, %d): the swarm's bottleneck goes from %.1f to %.1f tokens/s "
            "(blocks with no server: %d -> %d)",
            me.start, me.end, first, first + length, now_min, after_min, now_gaps, after_gaps,
        )  # fmt: skip
        return first


def _selection_spans(spans: dict[str, RemoteSpanInfo]) -> list[Span]:
    return [Span(p, s.start, s.end, s.info.throughput or 1.0) for p, s in spans.items()]
