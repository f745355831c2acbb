"""From per-block DHT records to per-server spans: pure functions, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from corolla.wire.records import ServerInfo, ServerState


@dataclass(frozen=True)
class RemoteSpanInfo:
    """A server and the contiguous blocks [start, end) it serves, as found in the DHT."""

    peer_id: str
    start: int
    end: int
    info: ServerInfo


def compute_spans(
    block_infos: list[dict[str, ServerInfo]], states: tuple[ServerState, ...] = (ServerState.ONLINE,)
) -> dict[str, RemoteSpanInfo]:
    """Each server's span: the longest run of consecutive blocks where it has a record in ``states``.

    A server announces its whole range in every record; the span is still built from the records
    actually found, so a partly expired or partly stored announcement yields only the blocks that can
    be trusted (the first contiguous run).
    """
    spans: dict[str, RemoteSpanInfo] = {}
    for block, servers in enumerate(block_infos):
        for peer_id, info in servers.items():
            if info.state not in states or not info.start <= block < info.end:
                continue
            span = spans.get(peer_id)
            if span is None:
                spans[peer_id] = RemoteSpanInfo(peer_id, block, block + 1, info)
            elif span.end == block:
                spans[peer_id] = RemoteSpanInfo(peer_id, span.start, block + 1, info)
    return spans


def servers_per_block(block_infos: list[dict[str, ServerInfo]], states: tuple[ServerState, ...]) -> list[int]:
    """How many servers in ``states`` announce each block."""
    return [sum(info.state in states for info in servers.values()) for servers in block_infos]
