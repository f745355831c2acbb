"""``corolla health``: join the DHT as a client and print each model's block coverage and servers.

The DHT cannot list its keys, so the models come from ``--model``: a checkpoint folder or Hub id (the
DHT prefix and block count are derived the way a server derives them) or a bare DHT prefix together
with ``--num_blocks``. The table itself is built by :mod:`corolla.cli.health_table`; this module only
reads the records and prints.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime

from corolla.cli.common import add_network_flags, flag, network_config, setup_logging
from corolla.cli.health_table import ModelHealth, format_health
from corolla.client.swarm_reader import SwarmReader

CLEAR_SCREEN = "\x1b[H\x1b[2J"  # cursor home, erase the screen
DEFAULT_WATCH_SECONDS = 2.0
FETCH_TIMEOUT = 30.0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="corolla health")
    parser.description = (
        "Show which blocks of each model the swarm serves and by whom. Coverage is one character per "
        "block: '.' no online server, '1'..'9' that many, '+' more than 9. Then one row per server: name, "
        "blocks [start:end), state, throughput (tokens/s), inference latency (ms per token per block), "
        "free KV-cache tokens, software and wire versions, dtype, quantization, direct or relayed."
    )
    flag(parser, "model", nargs="+", action="extend", required=True, metavar="MODEL_OR_DHT_PREFIX",
         help="a checkpoint folder or Hub id (DHT prefix and block count derived from it, as a server "
         "does), or a bare DHT prefix when --num_blocks is given; repeat or list several")  # fmt: skip
    flag(parser, "num_blocks", type=int, default=None, metavar="N",
         help="number of blocks for models given as a bare DHT prefix (overrides a checkpoint's count)")  # fmt: skip
    flag(parser, "watch", nargs="?", type=float, const=DEFAULT_WATCH_SECONDS, default=None, metavar="SECONDS",
         help=f"refresh every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until Ctrl-C, clearing the screen "
         "on a terminal; without it, print once and exit")  # fmt: skip
    add_network_flags(parser, client=True)
    parser.set_defaults(log_level="WARNING")  # the table goes to stdout; keep stderr quiet by default
    return parser


def resolve_model(ref: str, num_blocks: int | None) -> tuple[str, int]:
    """``(dht_prefix, num_blocks)`` for a ``--model`` argument."""
    if num_blocks is not None and not os.path.isdir(ref):
        return ref, num_blocks  # a bare DHT prefix (a Hub id here would also need its config read)
    from corolla.models.checkpoint import Checkpoint, default_dht_prefix  # torch/transformers: only if needed

    try:
        config = Checkpoint(ref).config
    except Exception as e:
        raise SystemExit(
            f"corolla health: cannot read the config of {ref!r} ({e}); for a bare DHT prefix pass --num_blocks N"
        ) from e
    return default_dht_prefix(ref), num_blocks if num_blocks is not None else config.num_hidden_layers


def snapshot(reader: SwarmReader, models: list[tuple[str, int]]) -> str:
    return format_health([ModelHealth(prefix, reader.block_infos(prefix, n)) for prefix, n in models])


def watch(reader: SwarmReader, models: list[tuple[str, int]], period: float) -> None:
    """Redraw until Ctrl-C: the screen is cleared on a terminal, snapshots are appended otherwise."""
    tty = sys.stdout.isatty()
    try:
        while True:
            text = snapshot(reader, models)
            stamp = f"corolla health  {datetime.now():%H:%M:%S}  (every {period:g} s, Ctrl-C to stop)\n\n"
            sys.stdout.write((CLEAR_SCREEN if tty else "") + stamp + text + ("" if tty else "\n"))
            sys.stdout.flush()
            time.sleep(period)
    except KeyboardInterrupt:
        pass


def run(args: argparse.Namespace) -> None:
    setup_logging(args.log_level)
    if args.watch is not None and args.watch <= 0:
        raise SystemExit("corolla health: --watch SECONDS must be positive")
    models = [resolve_model(ref, args.num_blocks) for ref in dict.fromkeys(args.model)]
    with SwarmReader(
        network_config(args, client_mode=True), name="corolla-health", timeout=FETCH_TIMEOUT
    ) as reader:
        if args.watch is None:
            sys.stdout.write(snapshot(reader, models))
            sys.stdout.flush()
        else:
            watch(reader, models, args.watch)


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
