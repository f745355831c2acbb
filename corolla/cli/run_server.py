"""``corolla server MODEL``: host a span of a model's blocks for the swarm (Petals' flag names)."""

from __future__ import annotations

import argparse
import logging
import sys

from corolla.cli.common import add_network_flags, flag, network_config, run_until_signal, setup_logging
from corolla.server.config import CacheConfig, LimitsConfig, ServerConfig


def _block_range(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END (END exclusive), got {text!r}") from None
    return start, end


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="corolla server")
    parser.description = (
        "Serve a contiguous span of a model's transformer blocks to the swarm. MODEL is a local checkpoint "
        "folder or a Hugging Face Hub repo id; only the hosted blocks' tensors are read (and downloaded)."
    )
    parser.add_argument("model", metavar="MODEL",
                        help="local checkpoint folder, Hub repo id, or GGUF file (FILE.gguf, or a Hub repo with "
                        "--gguf_file)")  # fmt: skip
    flag(
        parser,
        "gguf_file",
        default=None,
        metavar="NAME",
        help="with a Hub repo id as MODEL: serve this GGUF file of the repo (read as ORG/REPO/NAME)",
    )
    blocks = parser.add_mutually_exclusive_group()
    flag(blocks, "num_blocks", type=int, default=None,
         help="host this many consecutive blocks, placed where the swarm is weakest (default: as many as "
              "fit in free memory with their cache budget)")  # fmt: skip
    flag(blocks, "block_indices", type=_block_range, default=None, metavar="START:END",
         help="host exactly blocks START..END-1")  # fmt: skip
    flag(parser, "dht_prefix", default=None,
         help="name the model is announced under (default: the repo or folder name)")  # fmt: skip
    flag(parser, "public_name", default="", help="a name shown to others (e.g. on the health dashboard)")
    flag(parser, "device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps")
    flag(parser, "torch_dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
         help="dtype of the blocks and cache; auto = the checkpoint's dtype")  # fmt: skip
    flag(parser, "quant_type", default="none", choices=["none", "int8", "nf4"],
         help="weight-only quantization of the hosted blocks' linear layers: int8 (per-channel, ~1/2 of bf16) "
              "or nf4 (4-bit NormalFloat, blocks of 64); bitsandbytes on CUDA (default: %(default)s)")  # fmt: skip
    flag(parser, "revision", default=None, help="Hub revision (branch, tag or commit)")
    flag(parser, "token", default=None, help="Hugging Face token for gated models (default: the saved login)")
    flag(parser, "attn_cache_tokens", type=int, default=16384,
         help="KV-cache budget in tokens per hosted block, shared by all sessions (default: %(default)s)")  # fmt: skip
    flag(parser, "max_alloc_timeout", type=float, default=600,
         help="seconds a session waits for cache space before failing with a cache-full error")  # fmt: skip
    flag(parser, "inference_max_length", type=int, default=8192,
         help="longest session (prompt + generated tokens) accepted")  # fmt: skip
    flag(parser, "max_batch_size", type=int, default=8192, help="largest batch accepted per request")
    flag(parser, "batching", default="on", choices=["on", "off"],
         help="on: run the waiting inference steps of concurrent sessions as one forward (continuous "
              "batching); off: one step at a time")  # fmt: skip
    flag(parser, "max_batch_tokens", type=int, default=256,
         help="most tokens (rows x tokens) in one batched forward; longer prefills go in chunks, so one long "
              "prompt never stalls the other sessions' next tokens")  # fmt: skip
    flag(parser, "request_timeout", type=float, default=180,
         help="seconds one forward or inference step may take before it fails")  # fmt: skip
    flag(parser, "session_timeout", type=float, default=300,
         help="an inference session idle for this many seconds is closed and its cache freed")  # fmt: skip
    flag(parser, "update_period", type=float, default=30, help="seconds between DHT announcements")
    flag(parser, "expiration", type=float, default=None,
         help="seconds a DHT announcement lives (default: 2.5 x update_period)")  # fmt: skip
    flag(parser, "num_threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    flag(parser, "throughput", default="auto", metavar="auto|eval|N",
         help="tokens/s per block to announce: auto = measured once and cached on disk per device, dtype and "
              "model; eval = measure again; a number = use it (default: %(default)s)")  # fmt: skip
    flag(parser, "balance_period", type=float, default=120,
         help="seconds between checks whether moving to other blocks would help the swarm (jittered; 0 = never "
              "move; --block_indices never moves) (default: %(default)s)")  # fmt: skip
    flag(parser, "balance_quality", type=float, default=0.75,
         help="move only if the swarm's slowest block now is below this share of its speed after the move "
              "(0 < q <= 1; 1 = any improvement) (default: %(default)s)")  # fmt: skip
    flag(parser, "adapters", nargs="+", default=[], metavar="ADAPTER",
         help="PEFT LoRA adapters to serve: local folders or Hub repo ids holding adapter_config.json and "
              "adapter_model.safetensors, each optionally NAME=REF; clients pick one with active_adapter=NAME "
              "(default name: REF)")  # fmt: skip
    flag(parser, "max_client_adapter_bytes", type=int, default=256 * 2**20,
         help="most bytes of LoRA weights one client may upload here to train them (0 = refuse client "
              "adapters) (default: %(default)s)")  # fmt: skip
    flag(parser, "client_adapter_ttl", type=float, default=600,
         help="seconds an unused client adapter is kept before it is dropped (default: %(default)s)")  # fmt: skip
    limits = parser.add_argument_group("limits per client (peer id); beyond them a request is refused at once")
    flag(limits, "max_client_cache_share", type=float, default=0.5,
         help="share of the KV-cache budget one client's sessions may hold or wait for (0 < share <= 1; "
              "1 = no share of its own)")  # fmt: skip
    flag(limits, "max_client_sessions", type=int, default=32,
         help="inference sessions one client may have open or waiting for cache here (0 = no bound)")  # fmt: skip
    flag(limits, "max_client_jobs", type=int, default=64,
         help="compute jobs (inference steps, forwards, backwards) one client may have waiting or running; "
              "clients with waiting jobs take turns job by job (0 = no bound)")  # fmt: skip
    flag(limits, "max_client_calls", type=int, default=128,
         help="calls (streams) one client may have open here, from its first byte until it hangs up; push "
              "streams from other servers count per session instead (0 = no bound)")  # fmt: skip
    add_network_flags(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    model = args.model
    if args.gguf_file:
        if model.lower().endswith(".gguf") or model.count("/") != 1:
            raise SystemExit(f"--gguf_file needs a Hub repo id (ORG/REPO) as MODEL, got {model!r}")
        model = f"{model}/{args.gguf_file}"
    return ServerConfig(
        model=model,
        network=network_config(args),
        cache=CacheConfig(attn_cache_tokens=args.attn_cache_tokens, max_alloc_timeout=args.max_alloc_timeout),
        limits=LimitsConfig(
            max_client_cache_share=args.max_client_cache_share,
            max_client_sessions=args.max_client_sessions,
            max_client_jobs=args.max_client_jobs,
            max_client_calls=args.max_client_calls,
        ),
        block_indices=args.block_indices,
        num_blocks=args.num_blocks,
        dht_prefix=args.dht_prefix,
        device=args.device,
        torch_dtype=args.torch_dtype,
        quant_type=args.quant_type,
        revision=args.revision,
        token=args.token,
        public_name=args.public_name,
        inference_max_length=args.inference_max_length,
        max_batch_size=args.max_batch_size,
        batching=args.batching == "on",
        max_batch_tokens=args.max_batch_tokens,
        request_timeout=args.request_timeout,
        session_timeout=args.session_timeout,
        update_period=args.update_period,
        expiration=args.expiration,
        num_threads=args.num_threads,
        throughput=args.throughput,
        balance_period=args.balance_period,
        balance_quality=args.balance_quality,
        adapters=tuple(args.adapters),
        max_client_adapter_bytes=args.max_client_adapter_bytes,
        client_adapter_ttl=args.client_adapter_ttl,
    )


def run(args: argparse.Namespace) -> None:
    setup_logging(args.log_level)
    config = config_from_args(args)
    from corolla.server.adapters import AdapterLoadError
    from corolla.server.server import Server  # heavy imports (torch, transformers) only when serving

    server = Server(config)
    try:
        run_until_signal(server.run)
    except AdapterLoadError as e:  # a user error: say it, without a traceback
        logging.getLogger("corolla").error("%s", e)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
