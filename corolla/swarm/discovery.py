"""Announce and look up :class:`ServerInfo` records in the DHT.

Block ``i`` of a model lives under the key ``"{dht_prefix}.{i}"``; each server stores its record there
with its peer id (base58) as the subkey, so one key holds every server of that block. Records expire;
a server refreshes them before they do, and a dead server's records simply lapse.

Readers see the records through one small seam, :class:`Discovery` (what a client needs: the records of
a model's blocks); :class:`DHTDiscovery` reads the DHT, :class:`corolla.swarm.memory.InMemoryDiscovery`
serves records a unit test sets.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from hivemind.dht import DHTNode
from hivemind.utils import get_dht_time

from corolla.wire.codec import pack, unpack
from corolla.wire.errors import BadRequestError
from corolla.wire.records import MAX_MODELS, MAX_RECORD_BYTES, MODELS_KEY, ModelRecord, ServerInfo

logger = logging.getLogger(__name__)


class Discovery(Protocol):
    async def block_infos(self, dht_prefix: str, num_blocks: int) -> list[dict[str, ServerInfo]]:
        """For each block 0..num_blocks-1, ``{peer_id: ServerInfo}`` of the servers announcing it."""
        ...


class DHTDiscovery:
    """:class:`Discovery` over a DHT node."""

    def __init__(self, dht: DHTNode):
        self.dht = dht

    async def block_infos(self, dht_prefix: str, num_blocks: int) -> list[dict[str, ServerInfo]]:
        return await fetch_block_infos(self.dht, dht_prefix, num_blocks)


def block_key(dht_prefix: str, block: int) -> str:
    return f"{dht_prefix}.{block}"


async def announce(
    dht: DHTNode, dht_prefix: str, peer_id: str, blocks: Sequence[int], info: ServerInfo, expiration: float
) -> bool:
    """Store ``info`` for every block in ``blocks``; returns whether every store succeeded."""
    value = pack(info)
    expiration_time = get_dht_time() + expiration
    keys = [block_key(dht_prefix, b) for b in blocks]
    results = await dht.store_many(
        keys, [value] * len(keys), [expiration_time] * len(keys), subkeys=[peer_id] * len(keys)
    )
    ok = all(results.values())
    if not ok:
        logger.warning("Could not store %d of %d block records", sum(not v for v in results.values()), len(keys))
    return ok


async def fetch_block_infos(dht: DHTNode, dht_prefix: str, num_blocks: int) -> list[dict[str, ServerInfo]]:
    """For each block 0..num_blocks-1, the live records: ``{peer_id: ServerInfo}``.

    Records that do not decode (another version, garbage) are skipped with a debug log.
    """
    keys = [block_key(dht_prefix, b) for b in range(num_blocks)]
    found = await dht.get_many(keys, sufficient_expiration_time=float("inf"))
    out: list[dict[str, ServerInfo]] = []
    for key in keys:
        entry = found.get(key)
        servers: dict[str, ServerInfo] = {}
        if entry is not None and isinstance(entry.value, dict):
            for peer_id, item in entry.value.items():
                info = _decode(item.value)
                if info is not None and isinstance(peer_id, str):
                    servers[peer_id] = info
        out.append(servers)
    return out


async def announce_model(dht: DHTNode, record: ModelRecord, expiration: float) -> bool:
    """Name ``record``'s model in the swarm's model directory (one subkey per DHT prefix)."""
    return bool(await dht.store(MODELS_KEY, pack(record), get_dht_time() + expiration, subkey=record.dht_prefix))


async def fetch_models(dht: DHTNode) -> list[ModelRecord]:
    """The models servers have named in the directory, by DHT prefix (malformed entries skipped)."""
    entry = await dht.get(MODELS_KEY, latest=True)
    if entry is None or not isinstance(entry.value, dict):
        return []
    models = []
    for prefix, item in list(entry.value.items())[:MAX_MODELS]:
        record = _decode(item.value, ModelRecord)
        if record is not None and record.dht_prefix == prefix and 0 < record.num_blocks <= 100_000:
            models.append(record)
    return sorted(models, key=lambda r: r.dht_prefix)


def _decode(value: object, cls: type = ServerInfo):
    if not isinstance(value, bytes) or len(value) > MAX_RECORD_BYTES:
        return None
    try:
        return unpack(cls, value, max_tensor_bytes=0)
    except BadRequestError as e:
        logger.debug("Skipping a malformed %s record: %s", cls.__name__, e)
        return None
