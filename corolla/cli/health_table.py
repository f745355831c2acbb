"""The text of ``corolla health``: DHT records in, a terminal table out. Pure functions, no I/O.

Coverage counts only ONLINE servers (a JOINING or OFFLINE server cannot take a request yet or any
more), while the server rows list every record found, whatever its state, so an operator sees the
servers that are coming up or going away. A server's row shows the range it announces, which is what
it claims to serve; the coverage line shows what the records per block actually say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from corolla.wire.records import ServerInfo, ServerState

NO_SERVER = "."
MANY = "+"  # more than 9 servers on one block
SHORT_ID_CHARS = 8

COLUMNS = (
    "server", "blocks", "state", "tok/s", "ms/blk", "free cache", "version", "wire", "dtype", "quant", "conn",
)  # fmt: skip


@dataclass(frozen=True)
class ModelHealth:
    """What was read for one model: its DHT prefix and, per block, ``{peer_id: ServerInfo}``."""

    dht_prefix: str
    block_infos: list[dict[str, ServerInfo]]


def coverage_char(count: int) -> str:
    if count <= 0:
        return NO_SERVER
    return str(count) if count <= 9 else MANY


def coverage_line(counts: Sequence[int]) -> str:
    """One character per block: '.' for none, '1'..'9' for that many servers, '+' for more than 9."""
    return "".join(coverage_char(c) for c in counts)


def online_counts(block_infos: Sequence[dict[str, ServerInfo]]) -> list[int]:
    return [sum(info.state == ServerState.ONLINE for info in servers.values()) for servers in block_infos]


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


def server_name(peer_id: str, info: ServerInfo) -> str:
    """The public name a server chose, else the tail of its peer id (the head is the same for all)."""
    return info.public_name or f"...{peer_id[-SHORT_ID_CHARS:]}"


def server_rows(block_infos: Sequence[dict[str, ServerInfo]]) -> list[tuple[str, ...]]:
    """One row per server found under any block, ordered by first block then name."""
    seen: dict[str, ServerInfo] = {}
    for servers in block_infos:
        for peer_id, info in servers.items():
            seen.setdefault(peer_id, info)
    ordered = sorted(seen.items(), key=lambda item: (item[1].start, item[1].end, server_name(*item)))
    return [_row(peer_id, info) for peer_id, info in ordered]


def _row(peer_id: str, info: ServerInfo) -> tuple[str, ...]:
    return (
        server_name(peer_id, info),
        f"[{info.start}:{info.end})",
        info.state.value,
        f"{info.throughput:.1f}",
        f"{info.inference_latency * 1000:.1f}",  # recorded in seconds per token per block
        str(info.free_cache_tokens),
        info.software_version or "?",
        str(info.wire_version),
        info.torch_dtype,
        info.quantization,
        "relayed" if info.relayed else "direct",
    )


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned text columns two spaces apart, a dashed rule under the header."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def format_model(model: ModelHealth) -> str:
    """The coverage summary and the server table of one model."""
    counts = online_counts(model.block_infos)
    rows = server_rows(model.block_infos)
    online = sum(row[2] == ServerState.ONLINE.value for row in rows)
    lines = [
        f"model {model.dht_prefix}: {len(counts)} blocks, {len(rows)} servers ({online} online)",
        f"  coverage  [{coverage_line(counts)}]",
        f"  no server: {block_ranges([b for b, c in enumerate(counts) if c == 0])}",
        f"  1 server:  {block_ranges([b for b, c in enumerate(counts) if c == 1])}",
    ]
    if rows:
        lines += ["", *("  " + text for text in render_table(COLUMNS, rows))]
    else:
        lines.append("  (no server records found under this prefix)")
    return "\n".join(lines)


def format_health(models: Sequence[ModelHealth]) -> str:
    """Every model's section, separated by a blank line."""
    return "\n\n".join(format_model(m) for m in models) + "\n"
