"""``corolla swarm-key FILE``: make a new private swarm's key."""

from __future__ import annotations

import argparse
import sys


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="corolla swarm-key")
    parser.description = (
        "Write a new random swarm key to FILE (mode 0600; an existing file is never overwritten) and print its "
        "fingerprint. Give the file to every member of the private swarm, over a channel you trust, and start "
        "every `corolla dht/server/health/monitor/api` and client with it (--swarm_key FILE, or swarm_key= in "
        "Python). Peers without it cannot call the swarm's servers, nor find, read or write its records; what "
        "they can still see is in docs/security.md. Anyone holding the file is a member: to remove one, make a "
        "new key and restart the swarm with it."
    )
    parser.add_argument("path", metavar="FILE", help="where to write the key (must not exist)")
    return parser


def run(args: argparse.Namespace) -> None:
    from corolla.swarm.trust import SwarmKey

    try:
        key = SwarmKey.generate(args.path)
    except FileExistsError:
        raise SystemExit(
            f"corolla swarm-key: {args.path} exists; not overwriting a key (pick another path)"
        ) from None
    except OSError as e:
        raise SystemExit(f"corolla swarm-key: cannot write {args.path}: {e.strerror or e}") from None
    print(f"Wrote a new swarm key to {args.path} (fingerprint {key.fingerprint})")


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
