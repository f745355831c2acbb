"""Pieces every command line shares: logging to stderr, network flags, running a coroutine until a signal."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corolla.swarm.config import NetworkConfig


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
        datefmt="%H:%M:%S",
    )
    # hivemind logs through its own handlers; keep its chatter at warnings unless debugging
    if level.upper() != "DEBUG":
        logging.getLogger("hivemind").setLevel(logging.WARNING)


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """A description as written, and every option's default at the end of its help (unless it says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" in text
            or action.default is None
            or action.default is False
            or action.default is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)"


def flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, **kwargs: Any) -> None:
    """Add ``--some_flag`` with a ``--some-flag`` alias (Petals spells flags with underscores); its help ends
    with its default unless it already says it (or there is none to say)."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    help_text = kwargs.get("help")
    action = kwargs.get("action")
    default = kwargs.get("default")
    says_default = help_text is None or "default" in help_text or help_text == argparse.SUPPRESS
    if not says_default and default not in (None, "", [], ()) and action not in ("store_true", "store_false"):
        kwargs["help"] = f"{help_text} (default: %(default)s)"
    parser.add_argument(*names, dest=name, **kwargs)


def add_network_flags(parser: argparse.ArgumentParser, client: bool = False) -> None:
    group = parser.add_argument_group("network")
    flag(group, "initial_peers", nargs="*", default=[], metavar="MADDR",
         help="multiaddrs of peers already in the swarm (what `corolla dht` printed)")  # fmt: skip
    flag(group, "host_maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"], metavar="MADDR",
         help="multiaddrs to listen on (default: all interfaces, a random TCP port); "
         "e.g. /ip4/0.0.0.0/tcp/31337 for a fixed port")  # fmt: skip
    flag(group, "announce_maddrs", nargs="*", default=[], metavar="MADDR",
         help="multiaddrs others should dial to reach this peer, e.g. your public IP and forwarded port")  # fmt: skip
    flag(group, "identity_path", default=None, metavar="FILE",
         help="private key file: keeps the same peer id across restarts (created if missing)")  # fmt: skip
    flag(group, "no_nat_port_map", action="store_true", help="do not try UPnP/NAT-PMP port mapping")
    add_swarm_key_flag(group)
    flag(parser, "log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity")


def add_swarm_key_flag(parser) -> None:
    flag(parser, "swarm_key", default=None, metavar="FILE",
         help="the private swarm's key file (make one with `corolla swarm-key FILE` and give it to every member): "
         "servers refuse callers without it, records are sealed with it (default: $COROLLA_SWARM_KEY if set, "
         "else none: an OPEN swarm that anyone who reaches a peer can join; \"\" forces open; see docs/security.md)")  # fmt: skip


def check_swarm_key(command: str, path: str | None) -> str | None:
    """The swarm key file to use (``path``, else $COROLLA_SWARM_KEY; None: open); exits with a clear message if
    it is not a usable key, before anything starts."""
    from corolla.swarm.trust import SwarmKey, SwarmKeyError, swarm_key_path

    path = swarm_key_path(path)
    if path is not None:
        try:
            SwarmKey.load(path)
        except SwarmKeyError as e:
            raise SystemExit(f"corolla {command}: {e}") from None
    return path


def network_config(args: argparse.Namespace, client_mode: bool = False) -> NetworkConfig:
    from corolla.swarm.config import NetworkConfig

    # resolved here ("" for open), so that the node does not look at $COROLLA_SWARM_KEY a second time
    swarm_key = check_swarm_key(getattr(args, "command", None) or "", args.swarm_key) or ""
    return NetworkConfig(
        initial_peers=tuple(args.initial_peers),
        host_maddrs=tuple(args.host_maddrs),
        announce_maddrs=tuple(args.announce_maddrs),
        identity_path=args.identity_path,
        swarm_key=swarm_key,
        client_mode=client_mode,
        nat_port_map=not args.no_nat_port_map,
    )


def run_until_signal(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run ``main(stop)`` in a fresh event loop; SIGINT/SIGTERM set ``stop`` (a second one exits at once)."""
    from corolla.swarm.loop import new_event_loop

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signame: str) -> None:
            if stop.is_set():
                logging.getLogger("corolla").warning("Second %s: exiting now", signame)
                sys.exit(1)
            logging.getLogger("corolla").info("Got %s, stopping", signame)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig.name)
        await main(stop)

    loop = new_event_loop()
    try:
        loop.run_until_complete(runner())
    finally:
        _cancel_pending(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _cancel_pending(loop: asyncio.AbstractEventLoop, timeout: float = 5.0) -> None:
    """Cancel the tasks still running (streams, pushes, library internals) and let them finish, as
    ``asyncio.run`` does, so that closing the loop destroys no pending task."""
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=timeout))
