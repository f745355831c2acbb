"""``corolla monitor``: the swarm health dashboard as a small web server.

Joins the DHT as a client-mode peer (it never calls a server), re-reads the models' records every
``--refresh`` seconds on a thread (:class:`~corolla.monitor.collector.StateCollector`) and serves the
page and ``/api/v1/state`` with uvicorn. The listening socket is bound here, before uvicorn starts, so
``--port 0`` works and the address printed on stdout is the real one.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys

from corolla.cli.common import add_network_flags, flag, network_config, setup_logging
from corolla.cli.health import MODELS_HELP, add_model_flags, resolve_models

logger = logging.getLogger("corolla.monitor")

DEFAULT_PORT = 8100
DEFAULT_REFRESH_SECONDS = 2.0
FETCH_TIMEOUT = 30.0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="corolla monitor")
    parser.description = (
        "Serve a web dashboard of the swarm's health: per model, a bar per server along the block axis "
        "coloured by state (green online, yellow joining, grey offline), a coverage strip with one cell "
        "per block (red: no online server, orange: one, green: two or more) and a table of every server's "
        "record; the raw state is JSON at /api/v1/state. It only reads the DHT, as a client-mode peer, and "
        "never contacts a server. Prints the dashboard's URL on stdout; logs go to stderr. " + MODELS_HELP
    )
    add_model_flags(parser)
    flag(parser, "host", default="127.0.0.1", metavar="ADDRESS",
         help="address the web server listens on (default 127.0.0.1, this machine only; 0.0.0.0 for every "
         "interface: the dashboard has no authentication, it shows what anyone in the swarm can read)")  # fmt: skip
    flag(parser, "port", type=int, default=DEFAULT_PORT, metavar="PORT",
         help=f"TCP port of the web server (default {DEFAULT_PORT}; 0 picks a free one, printed on stdout)")  # fmt: skip
    flag(parser, "refresh", type=float, default=DEFAULT_REFRESH_SECONDS, metavar="SECONDS",
         help=f"re-read the DHT every SECONDS (default {DEFAULT_REFRESH_SECONDS:g}); the page polls as often")  # fmt: skip
    add_network_flags(parser, client=True)
    return parser


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6, as the host resolves)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise SystemExit(f"corolla monitor: cannot listen on {host}:{port}: {e}") from e
    sock.listen(128)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def serve(app, sock: socket.socket) -> None:
    """Run uvicorn on ``sock`` until SIGINT/SIGTERM, then return so the caller can clean up."""
    import uvicorn

    def note(signum: int, frame: object) -> None:  # uvicorn re-raises the signal it stopped on: land here
        logger.info("Got %s, stopping", signal.Signals(signum).name)

    signal.signal(signal.SIGINT, note)
    signal.signal(signal.SIGTERM, note)
    config = uvicorn.Config(app, log_config=None, access_log=False, log_level="warning", lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


def run(args: argparse.Namespace) -> None:
    setup_logging(args.log_level)
    if args.refresh <= 0:
        raise SystemExit("corolla monitor: --refresh SECONDS must be positive")
    if not 0 <= args.port <= 65535:
        raise SystemExit(f"corolla monitor: --port {args.port} is not a TCP port")
    models = resolve_models(args, prog="corolla monitor")
    sock = bind(args.host, args.port)  # before joining the DHT: a taken port fails fast

    from corolla.monitor.app import create_app
    from corolla.monitor.collector import StateCollector
    from corolla.swarm.reader import SwarmReader

    shown = (
        ", ".join(f"{prefix} ({n or '?'} blocks)" for prefix, n in models)
        if models is not None
        else "every model in the swarm's directory"
    )
    logger.info("Joining the DHT as a client to read %s, every %g s", shown, args.refresh)
    with SwarmReader(
        network_config(args, client_mode=True), name="corolla-monitor", timeout=FETCH_TIMEOUT
    ) as reader:
        collector = StateCollector(reader, models, args.refresh).start()
        try:
            url = url_of(sock)
            print(url, flush=True)
            logger.info("Dashboard at %s (raw state at %sapi/v1/state); Ctrl-C to stop", url, url)
            serve(create_app(collector.latest), sock)
        finally:
            collector.stop()
            sock.close()
    logger.info("Monitor stopped")


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
