"""The state of a swarm as its DHT records describe it: one source for ``corolla health`` and ``corolla monitor``.

Pure functions and frozen dataclasses, no I/O: per-block records (what
:func:`corolla.swarm.discovery.fetch_block_infos` returns) in, a :class:`ModelState` out, and from it a
JSON-able dict (the monitor's ``/api/v1/state``, ``corolla health --json``) and the text table.

Decisions:

- Coverage counts only ONLINE servers: a JOINING server cannot take a request yet and an OFFLINE one
  no longer does, so neither closes a gap. Every record found is still listed, whatever its state, so
  an operator sees servers coming up or going away.
- A server stores one record per hosted block; they are announced together, so the copies agree except
  while an update propagates. The entry keeps the copy found under its lowest block and also records
  under which blocks a copy was found (``found_blocks``), which is what the coverage counts.
- Every :class:`ServerInfo` field goes into the JSON generically (enums as their value, tuples as
  lists, non-finite floats as null), so fields added to the record later show up without changes here.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from corolla.wire.records import ServerInfo, ServerState
from corolla.wire.reports import ReportSummary

STATE_VERSION = 1  # of the JSON layout below; bump when a key changes meaning or goes away
SHORT_ID_CHARS = 8

BlockRecords = Sequence[Mapping[str, ServerInfo]]  # per block: {peer_id: ServerInfo}


@dataclass(frozen=True)
class ServerEntry:
    """One server of one model: its record and the blocks under which the DHT holds a copy of it."""

    peer_id: str
    info: ServerInfo
    found_blocks: tuple[int, ...]
    #: clients' reports of this server returning wrong activations (None: none found)
    reports: ReportSummary | None = None

    @property
    def name(self) -> str:
        """The public name the server chose, else the tail of its peer id (the head is the same for all)."""
        return self.info.public_name or f"...{self.peer_id[-SHORT_ID_CHARS:]}"

    def to_json(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "name": self.name,
            "found_blocks": list(self.found_blocks),
            "info": info_json(self.info),
            "tamper_reports": None if self.reports is None else asdict(self.reports),
        }


@dataclass(frozen=True)
class BlockState:
    """Who holds a record for one block, counted by state; ``throughput`` sums the online servers'."""

    index: int
    online: int
    joining: int
    offline: int
    throughput: float
    peers: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "online": self.online,
            "joining": self.joining,
            "offline": self.offline,
            "throughput": _json_value(self.throughput),
            "peers": list(self.peers),
        }


@dataclass(frozen=True)
class ModelState:
    """One model (one DHT prefix): its blocks and its servers, ordered by first block then name."""

    dht_prefix: str
    blocks: tuple[BlockState, ...]
    servers: tuple[ServerEntry, ...]
    # True when the block count was not given but taken from the records (the largest announced end), so
    # trailing blocks that no server announces cannot show as gaps
    num_blocks_inferred: bool = False

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def coverage(self) -> list[int]:
        """Online servers per block."""
        return [b.online for b in self.blocks]

    @property
    def gaps(self) -> list[int]:
        """Blocks no online server serves: a client cannot run the model until they are covered."""
        return [b.index for b in self.blocks if b.online == 0]

    @property
    def single_server_blocks(self) -> list[int]:
        """Blocks exactly one online server serves: losing it opens a gap."""
        return [b.index for b in self.blocks if b.online == 1]

    @property
    def num_online(self) -> int:
        return sum(s.info.state == ServerState.ONLINE for s in self.servers)

    @property
    def bottleneck_throughput(self) -> float:
        """The swarm's tokens/s through its weakest block (0 with a gap): what a full chain can get at best."""
        return min((b.throughput for b in self.blocks), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "dht_prefix": self.dht_prefix,
            "num_blocks": self.num_blocks,
            "num_blocks_inferred": self.num_blocks_inferred,
            "coverage": self.coverage,
            "gaps": self.gaps,
            "single_server_blocks": self.single_server_blocks,
            "fully_covered": self.num_blocks > 0 and not self.gaps,
            "num_servers": len(self.servers),
            "num_online": self.num_online,
            "bottleneck_throughput": _json_value(self.bottleneck_throughput),
            "blocks": [b.to_json() for b in self.blocks],
            "servers": [s.to_json() for s in self.servers],
        }


def model_state(
    dht_prefix: str,
    block_records: BlockRecords,
    num_blocks_inferred: bool = False,
    reports: Mapping[str, ReportSummary] | None = None,
) -> ModelState:
    """Build a model's state from the records found under each of its blocks (and ``reports``: per peer id, what
    clients reported of it returning wrong activations)."""
    first: dict[str, ServerInfo] = {}
    found: dict[str, list[int]] = {}
    blocks = []
    for index, servers in enumerate(block_records):
        for peer_id, info in servers.items():
            first.setdefault(peer_id, info)
            found.setdefault(peer_id, []).append(index)
        states = [info.state for info in servers.values()]
        blocks.append(
            BlockState(
                index=index,
                online=states.count(ServerState.ONLINE),
                joining=states.count(ServerState.JOINING),
                offline=states.count(ServerState.OFFLINE),
                throughput=sum(i.throughput for i in servers.values() if i.state == ServerState.ONLINE),
                peers=tuple(sorted(servers)),
            )
        )
    reports = reports or {}
    entries = [ServerEntry(p, info, tuple(found[p]), reports.get(p)) for p, info in first.items()]
    entries.sort(key=lambda e: (e.info.start, e.info.end, e.name, e.peer_id))
    return ModelState(dht_prefix, tuple(blocks), tuple(entries), num_blocks_inferred)


def announced_block_count(block_records: BlockRecords) -> int:
    """The model's block count as far as the records tell: the largest ``end`` any server announces."""
    return max((info.end for servers in block_records for info in servers.values()), default=0)


def swarm_json(models: Sequence[ModelState], **extra: Any) -> dict[str, Any]:
    """The whole picture as a JSON-able dict; ``extra`` adds top-level keys (timestamps, errors)."""
    return {"state_version": STATE_VERSION, **extra, "models": [m.to_json() for m in models]}


def info_json(info: ServerInfo) -> dict[str, Any]:
    """Every field of the record, by name, as JSON values."""
    return {f.name: _json_value(getattr(info, f.name)) for f in fields(info)}


def _json_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return value


def block_ranges(blocks: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'; an empty list -> 'none'."""
    if not blocks:
        return "none"
    parts: list[str] = []
    start = prev = blocks[0]
    for b in [*blocks[1:], None]:
        if b is not None and b == prev + 1:
            prev = b
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if b is not None:
            start = prev = b
    return ", ".join(parts)


def describe_changes(old: ModelState | None, new: ModelState) -> list[str]:
    """What changed between two reads of one model, one line each, for the monitor's log."""
    if old is None:
        gaps = f"; no online server for blocks {block_ranges(new.gaps)}" if new.gaps else ""
        return [f"{new.dht_prefix}: {len(new.servers)} servers ({new.num_online} online){gaps}"]
    lines = []
    before = {s.peer_id: s for s in old.servers}
    after = {s.peer_id: s for s in new.servers}
    for peer_id, s in after.items():
        was = before.get(peer_id)
        span = f"[{s.info.start}:{s.info.end})"
        if was is None:
            lines.append(f"server {s.name} {span} appeared ({s.info.state.value})")
            continue
        if (was.info.start, was.info.end) != (s.info.start, s.info.end):
            lines.append(f"server {s.name} moved [{was.info.start}:{was.info.end}) -> {span}")
        if was.info.state != s.info.state:
            lines.append(f"server {s.name} {span}: {was.info.state.value} -> {s.info.state.value}")
    for peer_id, s in before.items():
        if peer_id not in after:
            lines.append(f"server {s.name} [{s.info.start}:{s.info.end}) is gone (its records expired)")
    if old.gaps != new.gaps:
        lines.append(
            f"no online server for blocks {block_ranges(new.gaps)}" if new.gaps else "every block is served"
        )
    return [f"{new.dht_prefix}: {line}" for line in lines]
