"""Announce and look up records in the DHT: servers' :class:`ServerInfo`, the model directory, and any other
signed record (:meth:`RecordStore.store` / :meth:`RecordStore.fetch`).

Block ``i`` of a model lives under the key ``"{dht_prefix}.{i}"``; each server stores its record there
with its peer id (base58) as the subkey, so one key holds every server of that block. Records expire;
a server refreshes them before they do, and a dead server's records simply lapse.

Every value is a record signed by its writer and, in a private swarm, sealed with the swarm key and stored
under key names derived from it (:mod:`corolla.swarm.trust`). Readers open each one and skip, and count by
reason in :attr:`RecordStore.rejected`, what fails: another signer than the peer a server record names, a
record moved to another key, an expired or over-long one, one not sealed with the swarm's key, garbage.
Members' DHT nodes refuse to store such values at all (:class:`RecordValidator`).

Readers see the records through one small seam, :class:`Discovery` (what a client needs: the records of
a model's blocks); :class:`DHTDiscovery` reads the DHT, :class:`corolla.swarm.memory.InMemoryDiscovery`
serves records a unit test sets.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence
from typing import Protocol, TypeVar

import msgpack
from hivemind.dht import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time

from corolla.swarm.trust import RecordRejected, SwarmKey, Trust, open_record, sign_record
from corolla.wire.codec import pack, unpack
from corolla.wire.errors import BadRequestError
from corolla.wire.records import MAX_MODELS, MAX_RECORD_BYTES, MODELS_KEY, ModelRecord, RecordClaim, ServerInfo

R = TypeVar("R")
#: At most this many subkeys of one key are opened per read (a bound on what a DHT peer can make us check).
MAX_SUBKEYS = 1024

logger = logging.getLogger(__name__)


class Discovery(Protocol):
    async def block_infos(self, dht_prefix: str, num_blocks: int) -> list[dict[str, ServerInfo]]:
        """For each block 0..num_blocks-1, ``{peer_id: ServerInfo}`` of the servers announcing it."""
        ...

    def rejected(self) -> dict[str, int]:
        """Records ignored so far as invalid, by reason (see :class:`RecordStore`)."""
        ...


class RecordStore:
    """Signed (and, in a private swarm, sealed) records in a DHT, for one peer (its :class:`Trust`)."""

    def __init__(self, dht: DHTNode, trust: Trust):
        self.dht, self.trust = dht, trust
        #: reason -> how many records this peer's reads skipped for it (see the module docstring)
        self.rejected: collections.Counter[str] = collections.Counter()

    def _value(
        self, kind: str, key: str, subkey: str, owner: str, record: object, expiration_time: float
    ) -> bytes:
        claim = RecordClaim(
            kind=kind,
            dht_key=self.trust.dht_name(key),
            dht_subkey=self.trust.dht_name(subkey),
            owner=owner,
            expiration=expiration_time,
            body=pack(record),
        )
        return sign_record(self.trust, claim)

    async def store(
        self, kind: str, key: str, subkey: str, record: object, expiration: float, owned: bool
    ) -> bool:
        """Store ``record`` under (``key``, ``subkey``) for ``expiration`` seconds. ``owned``: the subkey is this
        peer's id and nobody else may write it (a server's own record), else any member may (a directory)."""
        owner = self.trust.peer_key.peer_id if owned else ""
        if owned and subkey != owner:
            raise ValueError(f"an owned record is stored under its owner's id, not {subkey!r}")
        expiration_time = get_dht_time() + expiration
        value = self._value(kind, key, subkey, owner, record, expiration_time)
        return bool(
            await self.dht.store(
                self.trust.dht_name(key), value, expiration_time, subkey=self.trust.dht_name(subkey)
            )
        )

    async def fetch(self, kind: str, key: str, cls: type[R]) -> dict[str, R]:
        """The valid records of ``kind`` under ``key``: ``{signer's peer id: record}`` for owned records, else
        ``{stored subkey: record}`` (a derived name in a private swarm: such records say what they are about)."""
        found = await self.dht.get(self.trust.dht_name(key), latest=True)
        return self._open(kind, key, found, cls)

    def _open(self, kind: str, key: str, found, cls: type[R]) -> dict[str, R]:
        if found is None or not isinstance(found.value, dict):
            return {}
        out: dict[str, R] = {}
        for stored_subkey, item in list(found.value.items())[:MAX_SUBKEYS]:
            if not isinstance(stored_subkey, str):
                self.rejected["malformed"] += 1
                continue
            try:
                claim, signer = open_record(
                    self.trust.swarm_key, item.value, self.trust.dht_name(key), stored_subkey
                )
                if claim.kind != kind:
                    raise RecordRejected("wrong_kind", f"{claim.kind} under a {kind} key")
                record = _decode(claim.body, cls)
            except RecordRejected as e:
                self.rejected[e.reason] += 1
                logger.debug("Skipping a record under %s/%s: %s", key, stored_subkey, e)
                continue
            out[signer if claim.owner else stored_subkey] = record
        return out

    async def announce(self, dht_prefix: str, blocks: Sequence[int], info: ServerInfo, expiration: float) -> bool:
        """Store ``info`` for every block in ``blocks`` under this peer's id; returns whether every store
        succeeded."""
        peer_id = self.trust.peer_key.peer_id
        expiration_time = get_dht_time() + expiration
        keys = [block_key(dht_prefix, b) for b in blocks]
        # ~0.7 ms of RSA per block: signed off the event loop, which answers pings and steps meanwhile
        values = await asyncio.to_thread(
            lambda: [self._value("server", key, peer_id, peer_id, info, expiration_time) for key in keys]
        )
        results = await self.dht.store_many(
            [self.trust.dht_name(k) for k in keys],
            values,
            [expiration_time] * len(keys),
            subkeys=[self.trust.dht_name(peer_id)] * len(keys),
        )
        ok = all(results.values())
        if not ok:
            logger.warning(
                "Could not store %d of %d block records", sum(not v for v in results.values()), len(keys)
            )
        return ok

    async def block_infos(self, dht_prefix: str, num_blocks: int) -> list[dict[str, ServerInfo]]:
        """For each block 0..num_blocks-1, the live records: ``{peer_id: ServerInfo}``, each checked (signed
        by the peer it is stored under, for that block, not expired) and covering the block it is found under."""
        keys = [block_key(dht_prefix, b) for b in range(num_blocks)]
        found = await self.dht.get_many(
            [self.trust.dht_name(k) for k in keys], sufficient_expiration_time=float("inf")
        )
        out = []
        for block, key in enumerate(keys):
            servers = self._open("server", key, found.get(self.trust.dht_name(key)), ServerInfo)
            for peer_id, info in list(servers.items()):
                if not info.start <= block < info.end:
                    self.rejected["misplaced"] += 1
                    del servers[peer_id]
            out.append(servers)
        return out

    async def announce_model(self, record: ModelRecord, expiration: float) -> bool:
        """Name ``record``'s model in the swarm's model directory (one subkey per DHT prefix)."""
        return await self.store("model", MODELS_KEY, record.dht_prefix, record, expiration, owned=False)

    async def models(self) -> list[ModelRecord]:
        """The models servers have named in the directory, by DHT prefix (malformed entries skipped).

        In a private swarm the directory's subkeys are derived names, so each record's own ``dht_prefix`` says
        which model it is; its claim binds it to the subkey derived from that prefix."""
        found = await self.fetch("model", MODELS_KEY, ModelRecord)
        models = []
        for stored_subkey, record in list(found.items())[:MAX_MODELS]:
            if stored_subkey == self.trust.dht_name(record.dht_prefix) and 0 < record.num_blocks <= 100_000:
                models.append(record)
            else:
                self.rejected["malformed"] += 1
        return sorted(models, key=lambda r: r.dht_prefix)


class DHTDiscovery:
    """:class:`Discovery` over a DHT node's :class:`RecordStore`."""

    def __init__(self, records: RecordStore):
        self.records = records

    async def block_infos(self, dht_prefix: str, num_blocks: int) -> list[dict[str, ServerInfo]]:
        return await self.records.block_infos(dht_prefix, num_blocks)

    def rejected(self) -> dict[str, int]:
        return dict(self.records.rejected)


def block_key(dht_prefix: str, block: int) -> str:
    return f"{dht_prefix}.{block}"


def _decode(value: bytes, cls: type[R]) -> R:
    if len(value) > MAX_RECORD_BYTES:
        raise RecordRejected("malformed", "too large")
    try:
        return unpack(cls, value, max_tensor_bytes=0)
    except BadRequestError as e:
        raise RecordRejected("malformed", f"not a {cls.__name__}: {e}") from None


class RecordValidator(RecordValidatorBase):
    """Makes this peer's DHT node refuse to store, or to believe when reading, any value that is not a valid
    corolla record (see :func:`corolla.swarm.trust.open_record`) placed where its claim says. Applied to
    every record the node is asked to store and every record a lookup returns."""

    def __init__(self, swarm_key: SwarmKey | None):
        self.swarm_key = swarm_key
        self.refused = 0

    def validate(self, record: DHTRecord) -> bool:
        try:
            value = msgpack.unpackb(record.value, raw=False, strict_map_key=True, max_bin_len=MAX_RECORD_BYTES)
            subkey = msgpack.unpackb(record.subkey, raw=False, max_str_len=1024)
            if not isinstance(value, bytes) or not isinstance(subkey, str):
                raise RecordRejected("malformed")
            claim, _ = open_record(self.swarm_key, value, None, subkey)
            if DHTID.generate(source=claim.dht_key).to_bytes() != record.key:
                raise RecordRejected("misplaced")
            if record.expiration_time > claim.expiration + 1.0:
                raise RecordRejected("extended", "stored to outlive its signed expiry")
        except (RecordRejected, ValueError, TypeError, msgpack.UnpackException) as e:
            self.refused += 1
            logger.debug("DHT refused a record: %s", e)
            return False
        return True
