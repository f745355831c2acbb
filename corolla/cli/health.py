"""``corolla health``: join the DHT as a client and print each model's block coverage and servers.

The DHT cannot list its keys, so the models come from ``--model``: a checkpoint folder or Hub id (the
DHT prefix and block count are derived the way a server derives them) or a bare DHT prefix together
with ``--num_blocks``. ``corolla monitor`` takes the same flags (:func:`add_model_flags`). The state
is built by :mod:`corolla.monitor.state` (shared with the dashboard) and laid out by
:mod:`corolla.cli.health_table`; this module only reads the records and prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING

from corolla.cli.common import add_network_flags, flag, network_config, setup_logging

if TYPE_CHECKING:  # the swarm reader (hivemind, torch) loads only when the command runs: --help is instant
    from corolla.monitor.collector import ModelRef
    from corolla.swarm.reader import SwarmReader

logger = logging.getLogger("corolla.health")

CLEAR_SCREEN = "\x1b[H\x1b[2J"  # cursor home, erase the screen
DEFAULT_WATCH_SECONDS = 2.0
FETCH_TIMEOUT = 30.0
MODELS_HELP = (
    "Without --model, every model that servers name in the swarm's model directory (a well-known DHT key "
    "each server refreshes) is shown. --model restricts the view: a checkpoint folder or Hub id (the DHT "
    "prefix and block count are derived from it, as a server derives them), or a bare DHT prefix (what "
    "servers pass as --dht_prefix). Without a block count (a bare prefix that no server names in the "
    "directory and no --num_blocks) the count is the largest block end any server announces."
)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--num_blocks``: which models to read (shared by health and monitor)."""
    flag(parser, "model", nargs="+", action="extend", default=None, metavar="MODEL_OR_DHT_PREFIX",
         help="only these models (default: every model in the swarm's directory): a checkpoint folder or "
         "Hub id (DHT prefix and block count derived from it, as a server does), or a bare DHT prefix (a "
         "name without '/'); repeat or list several")  # fmt: skip
    flag(parser, "num_blocks", type=int, default=None, metavar="N",
         help="number of blocks of every --model (overrides a checkpoint's count; without it a bare DHT "
         "prefix's count is inferred from the records)")  # fmt: skip


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="corolla health")
    parser.description = (
        "Show which blocks of each model the swarm serves and by whom. Coverage is one character per "
        "block: '.' no online server, '1'..'9' that many, '+' more than 9. Then one row per server: name, "
        "blocks [start:end), state, throughput (tokens/s), inference latency (ms per token per block), "
        "free KV-cache tokens, sessions per batched inference forward lately, software and wire versions, dtype, quantization, adapters, direct or "
        "relayed (and any record field added later). " + MODELS_HELP
    )
    add_model_flags(parser)
    flag(parser, "watch", nargs="?", type=float, const=DEFAULT_WATCH_SECONDS, default=None, metavar="SECONDS",
         help=f"refresh every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until Ctrl-C, clearing the screen "
         "on a terminal; without it, print once and exit")  # fmt: skip
    flag(parser, "json", action="store_true",
         help="print the raw state as JSON instead of the table (the same document as `corolla monitor`'s "
         "/api/v1/state: every record field, coverage, gaps); with --watch, one JSON document per line")  # fmt: skip
    add_network_flags(parser, client=True)
    parser.set_defaults(log_level="WARNING")  # the table goes to stdout; keep stderr quiet by default
    return parser


def resolve_model(ref: str, num_blocks: int | None, prog: str = "corolla health") -> ModelRef:
    """``(dht_prefix, num_blocks)`` for a ``--model`` argument; ``num_blocks`` None: infer it from the records.

    A folder is a checkpoint; a name with a '/' a Hub id, whose config is read if it can be (from the local
    Hub cache when offline); a bare name is a DHT prefix.
    """
    is_dir = os.path.isdir(ref) or (ref.lower().endswith(".gguf") and os.path.isfile(ref))  # a GGUF is one too
    if not is_dir and ref.startswith((".", "/", "~")):
        raise SystemExit(f"{prog}: checkpoint folder {ref!r} does not exist")
    if not is_dir and "/" not in ref:
        return ref, num_blocks  # a bare DHT prefix
    from corolla.models.checkpoint import Checkpoint, default_dht_prefix  # torch/transformers: only if needed

    if num_blocks is not None:
        return default_dht_prefix(ref), num_blocks  # the count is given: no need for the config
    try:
        config = Checkpoint(ref).config
    except Exception as e:
        if is_dir:
            raise SystemExit(f"{prog}: cannot read the config of checkpoint {ref!r}: {e}") from e
        logger.warning(
            "Cannot read the config of %r (%s); reading DHT prefix %r and taking its block count from the "
            "records (pass --num_blocks to see trailing blocks no server announces)",
            ref, e, default_dht_prefix(ref),
        )  # fmt: skip
        return default_dht_prefix(ref), None
    return default_dht_prefix(ref), config.num_hidden_layers


def resolve_models(args: argparse.Namespace, prog: str = "corolla health") -> list[ModelRef] | None:
    """The models to read; None: every model in the swarm's directory, found at each read."""
    if args.num_blocks is not None and args.num_blocks <= 0:
        raise SystemExit(f"{prog}: --num_blocks must be positive")
    if not args.model:
        return None
    return [resolve_model(ref, args.num_blocks, prog) for ref in dict.fromkeys(args.model)]


def snapshot(reader: SwarmReader, models: list[ModelRef] | None, as_json: bool = False) -> str:
    from corolla.cli.health_table import format_health
    from corolla.monitor.collector import read_models
    from corolla.monitor.state import swarm_json

    states = read_models(reader, models)
    trust = reader.trust_json()
    if as_json:
        return json.dumps(swarm_json(states, updated_at=time.time(), swarm=trust), allow_nan=False) + "\n"
    return format_trust(trust) + format_health(states)


def format_trust(trust: dict) -> str:
    """The swarm's line: private (by which key) or open, and the records ignored as invalid."""
    if trust["private"]:
        line = f"swarm: private (key {trust['key']}): only members can call its servers and read its records"
    else:
        line = "swarm: OPEN: anyone who reaches a peer can join, read these records and call these servers"
    ignored = trust["ignored_records"]
    if ignored:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(ignored.items()))
        line += f"\nignored {sum(ignored.values())} invalid record(s): {reasons}"
    return line + "\n\n"


def watch(reader: SwarmReader, models: list[ModelRef] | None, period: float, as_json: bool = False) -> None:
    """Redraw until interrupted (see :func:`stop_on_signals`): the screen is cleared on a terminal,
    snapshots are appended otherwise."""
    tty = sys.stdout.isatty() and not as_json
    while True:
        text = snapshot(reader, models, as_json)
        if not as_json:
            stamp = f"corolla health  {datetime.now():%H:%M:%S}  (every {period:g} s, Ctrl-C to stop)\n\n"
            text = (CLEAR_SCREEN if tty else "") + stamp + text + ("" if tty else "\n")
        sys.stdout.write(text)
        sys.stdout.flush()
        time.sleep(period)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt, whatever this process inherited.

    Python turns SIGINT into KeyboardInterrupt only if SIGINT was not ignored when it started, and a
    background job of a non-interactive shell (``cmd &`` in a script, some CI runners and test harnesses)
    starts with SIGINT ignored: ``--watch`` then never stopped on Ctrl-C or ``kill -INT``. Like the other
    long-running commands (server, dht, monitor), ``--watch`` installs its own handlers.
    """
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def run(args: argparse.Namespace) -> None:
    setup_logging(args.log_level)
    if args.watch is not None and args.watch <= 0:
        raise SystemExit("corolla health: --watch SECONDS must be positive")
    from corolla.swarm.reader import SwarmReader

    models = resolve_models(args)
    if args.watch is None:
        with SwarmReader(
            network_config(args, client_mode=True), name="corolla-health", timeout=FETCH_TIMEOUT
        ) as reader:
            sys.stdout.write(snapshot(reader, models, args.json))
            sys.stdout.flush()
        return
    stop_on_signals()  # before joining: a signal while the reader starts stops it as well
    try:
        with SwarmReader(
            network_config(args, client_mode=True), name="corolla-health", timeout=FETCH_TIMEOUT
        ) as reader:
            watch(reader, models, args.watch, args.json)
    except KeyboardInterrupt:
        pass  # the reader has closed (its p2pd stopped) on the way out of the with block


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
