"""The ``corolla`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help); each module has build_parser(parser) and run(args)
COMMANDS = {
    "dht": ("corolla.cli.run_dht", "start a bootstrap DHT peer and print its addresses"),
    "server": ("corolla.cli.run_server", "serve a span of a model's blocks"),
    "demo": ("corolla.cli.demo", "start a private swarm on this machine and chat with it"),
    "health": ("corolla.cli.health", "show block coverage and the servers of models in a swarm"),
    "api": ("corolla.cli.api", "serve an OpenAI-compatible API and a web chat for a model in a swarm"),
    "monitor": ("corolla.cli.monitor", "serve a web dashboard of the swarm's health (reads only the DHT)"),
    "swarm-key": ("corolla.cli.swarm_key", "make a private swarm's key file"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="corolla",
        description="Run large language models BitTorrent-style: servers host spans of a model's blocks, "
        "clients chain them. Run `corolla COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.build_parser(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    modules[args.command].run(args)


if __name__ == "__main__":
    main()
