"""``corolla api MODEL``: an OpenAI-compatible HTTP API and a web chat, answered by the swarm.

Joins the swarm as a client (``AutoDistributedModelForCausalLM``), loads the model's tokenizer (and
chat template), and serves :mod:`corolla.api` with uvicorn until Ctrl-C / SIGTERM; on the way out,
running generations are stopped (their sessions close) and the client leaves the swarm.
"""

from __future__ import annotations

import argparse
import logging
import sys

from corolla.cli.common import add_swarm_key_flag, check_swarm_key, flag, setup_logging

logger = logging.getLogger("corolla.api")

DEFAULT_MISSING_BLOCKS_TIMEOUT = 10.0
#: A session longer than a server's --inference_max_length (default 8192) is refused by that server, so a chat
#: request without max_tokens must not ask for the whole context of a 128k-token model.
DEFAULT_CONTEXT_CAP = 8192
#: On Ctrl-C / SIGTERM, streams still running get this long before they are cut (their sessions then close).
GRACEFUL_SHUTDOWN_SECONDS = 3


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="corolla api")
    parser.description = (
        "Serve an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions; streaming with "
        "server-sent events) and a web chat at / for a model served by a swarm. Each request runs in its own "
        "inference session; a server failing mid-answer is replaced without the HTTP client noticing."
    )
    parser.add_argument(
        "model", metavar="MODEL", help="checkpoint folder or Hub repo id (tokenizer and client head)"
    )
    flag(parser, "initial_peers", nargs="+", required=True, metavar="MADDR",
         help="multiaddrs of peers already in the swarm (what `corolla dht` printed)")  # fmt: skip
    flag(parser, "dht_prefix", default=None,
         help="name the model's servers announce (default: the repo or folder name)")  # fmt: skip
    add_swarm_key_flag(parser)
    flag(parser, "host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    flag(parser, "port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    flag(parser, "api_key", default=None, metavar="KEY",
         help="require 'Authorization: Bearer KEY' on /v1/ requests (default: no key)")  # fmt: skip
    flag(parser, "served_model_name", default=None, metavar="NAME",
         help="model id listed by /v1/models (default: MODEL as given); requests may also use the DHT prefix")  # fmt: skip
    flag(parser, "missing_blocks_timeout", type=float, default=DEFAULT_MISSING_BLOCKS_TIMEOUT, metavar="SECONDS",
         help="how long a request waits for servers of missing blocks before failing with 503 "
         f"(default {DEFAULT_MISSING_BLOCKS_TIMEOUT:g}; the Python client waits longer)")  # fmt: skip
    flag(parser, "context_length", type=int, default=None, metavar="TOKENS",
         help="longest prompt + completion (default: the model's max_position_embeddings, at most "
         f"{DEFAULT_CONTEXT_CAP}, the servers' default --inference_max_length)")  # fmt: skip
    flag(parser, "max_concurrent_requests", type=int, default=32, metavar="N",
         help="requests generating at once; more wait their turn (default 32)")  # fmt: skip
    flag(parser, "torch_dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
         help="dtype of the client's embeddings and LM head (default float32)")  # fmt: skip
    flag(parser, "log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity")
    return parser


def run(args: argparse.Namespace) -> None:
    setup_logging(args.log_level)
    if not 0 < args.port < 65536:
        raise SystemExit(f"corolla api: --port must be in 1..65535, got {args.port}")
    swarm_key = check_swarm_key("api", args.swarm_key) or ""  # "": resolved here, no second look at the env
    import uvicorn

    from corolla import AutoDistributedModelForCausalLM
    from corolla.api.app import create_app
    from corolla.api.engine import Engine
    from corolla.models.checkpoint import default_dht_prefix
    from corolla.models.gguf import load_tokenizer

    logger.info("Loading the tokenizer and client head of %s and joining the swarm", args.model)
    try:
        tokenizer = load_tokenizer(args.model)
    except (OSError, ValueError) as e:
        raise SystemExit(f"corolla api: cannot load the tokenizer of {args.model!r}: {e}") from e
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            args.model,
            initial_peers=args.initial_peers,
            dht_prefix=args.dht_prefix,
            swarm_key=swarm_key,
            torch_dtype=args.torch_dtype,
            missing_blocks_timeout=args.missing_blocks_timeout,
        )
    except Exception as e:  # a bad checkpoint, an unreachable swarm: say which, without a traceback
        raise SystemExit(f"corolla api: cannot load {args.model!r} or join the swarm: {e}") from e
    context = args.context_length or min(
        model.config.max_position_embeddings or DEFAULT_CONTEXT_CAP, DEFAULT_CONTEXT_CAP
    )
    engine = Engine(model, tokenizer, context, args.max_concurrent_requests)
    prefix = args.dht_prefix or default_dht_prefix(args.model)
    names = tuple(dict.fromkeys([args.served_model_name or args.model, args.model, prefix]))
    app = create_app(engine, names, args.api_key)
    logger.info(
        "Serving %s on http://%s:%d (web chat at /, API at /v1)%s",
        names[0], args.host, args.port, "; API key required" if args.api_key else "",
    )  # fmt: skip
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False,
                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)  # fmt: skip
    finally:
        engine.shutdown()
        model.shutdown()


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
