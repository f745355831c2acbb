"""``corolla dht``: a bootstrap DHT peer. Prints the multiaddrs others join with, one per line on stdout."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from corolla.cli.common import add_network_flags, network_config, run_until_signal, setup_logging

logger = logging.getLogger("corolla.dht")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="corolla dht")
    parser.description = (
        "Start a DHT peer that others use to join a swarm. It hosts no blocks. Its multiaddrs go to stdout, "
        "one per line (pass them as --initial_peers to servers and clients); logs go to stderr. "
        "Use --identity_path so the addresses stay the same across restarts."
    )
    add_network_flags(parser)
    return parser


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    from corolla.swarm.node import SwarmNode

    node = await SwarmNode.start(network_config(args))
    try:
        for maddr in await node.visible_maddrs():
            print(maddr, flush=True)
        logger.info("DHT peer running; pass the addresses above as --initial_peers. Ctrl-C to stop.")
        await stop.wait()
    finally:
        await node.shutdown()


def run(args: argparse.Namespace) -> None:
    setup_logging(args.log_level)
    run_until_signal(lambda stop: serve(args, stop))


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
