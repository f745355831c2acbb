"""The text of ``corolla health``: a :class:`~corolla.monitor.state.ModelState` in, a terminal table out.

Pure functions, no I/O. What counts as covered, and which record stands for a server, is decided once
in :mod:`corolla.monitor.state` (shared with the web dashboard); this module only lays it out. A
server's row shows the range it announces, which is what it claims to serve; the coverage line shows
what the records per block actually say.

Record fields this table does not know by name (added to ``ServerInfo`` later) get a column of their
own, so nothing a server announces is hidden; the bulky ones (config hash, RTT lists) stay in
``--json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

from corolla.monitor.state import ModelState, ServerEntry, block_ranges
from corolla.wire.records import ServerInfo

INFERRED = " (count inferred from the records)"
NO_SERVER = "."
MANY = "+"  # more than 9 servers on one block

COLUMNS = (
    "server", "blocks", "state", "tok/s", "ms/blk", "free cache", "batch", "version", "wire", "dtype", "quant",
    "adapters", "conn", "reported",
)  # fmt: skip
# fields shown by the columns above, or left to --json on purpose
SHOWN_FIELDS = {
    "state", "start", "end", "public_name", "throughput", "inference_latency", "free_cache_tokens",
    "software_version", "wire_version", "torch_dtype", "quantization", "adapters", "relayed", "batch_sessions",
}  # fmt: skip
JSON_ONLY_FIELDS = {"config_hash", "next_rtts", "inference_max_length", "max_batch_size"}


def coverage_char(count: int) -> str:
    if count <= 0:
        return NO_SERVER
    return str(count) if count <= 9 else MANY


def coverage_line(counts: Sequence[int]) -> str:
    """One character per block: '.' for none, '1'..'9' for that many servers, '+' for more than 9."""
    return "".join(coverage_char(c) for c in counts)


def extra_fields() -> list[str]:
    """ServerInfo fields without a column of their own, in declaration order."""
    return [f.name for f in fields(ServerInfo) if f.name not in SHOWN_FIELDS | JSON_ONLY_FIELDS]


def server_rows(model: ModelState) -> list[tuple[str, ...]]:
    """One row per server, ordered by first block then name (the state's order)."""
    extra = extra_fields()
    return [_row(entry) + tuple(_cell(getattr(entry.info, name)) for name in extra) for entry in model.servers]


def _row(entry: ServerEntry) -> tuple[str, ...]:
    info = entry.info
    return (
        entry.name,
        f"[{info.start}:{info.end})",
        info.state.value,
        f"{info.throughput:.1f}",
        f"{info.inference_latency * 1000:.1f}",  # recorded in seconds per token per block
        str(info.free_cache_tokens),
        f"{info.batch_sessions:.1f}",  # sessions per inference forward lately
        info.software_version or "?",
        str(info.wire_version),
        info.torch_dtype,
        info.quantization,
        ",".join(info.adapters) or "-",
        "relayed" if info.relayed else "direct",
        _reported(entry),
    )


def _reported(entry: ServerEntry) -> str:
    """Clients' reports of wrong activations: reporters (how many had a majority against it), or "-"."""
    r = entry.reports
    if r is None:
        return "-"
    return f"{r.reporters} ({r.confirmed} confirmed)"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) or "-"
    return str(getattr(value, "value", value))


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned text columns two spaces apart, a dashed rule under the header."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def format_model(model: ModelState) -> str:
    """The coverage summary and the server table of one model."""
    lines = [
        f"model {model.dht_prefix}: {model.num_blocks} blocks{INFERRED if model.num_blocks_inferred else ''}, "
        f"{len(model.servers)} servers "
        f"({model.num_online} online), bottleneck {model.bottleneck_throughput:.1f} tok/s",
        f"  coverage  [{coverage_line(model.coverage)}]",
        f"  no server: {block_ranges(model.gaps)}",
        f"  1 server:  {block_ranges(model.single_server_blocks)}",
    ]
    if model.servers:
        header = (*COLUMNS, *extra_fields())
        lines += ["", *("  " + text for text in render_table(header, server_rows(model)))]
    else:
        lines.append("  (no server records found under this prefix)")
    return "\n".join(lines)


def format_health(models: Sequence[ModelState]) -> str:
    """Every model's section, separated by a blank line."""
    return "\n\n".join(format_model(m) for m in models) + "\n"
