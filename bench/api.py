"""OpenAI-compatible API vs the Python client: time to first token and tokens/s, 1 and 16 concurrent streams.

A loopback swarm of the offline demo checkpoint (or ``--model``), two servers in a chain, and `corolla api`
as a subprocess. The same greedy requests (prompts of ``--prompt_tokens`` ids, ``--max_tokens`` new tokens,
eos suppressed so every stream has the same length) run through the API (the `openai` package, streamed
text completions with token-id prompts) and directly through ``model.generate`` of a distributed model in
this process (a streamer stamps the tokens). For each concurrency, runs alternate direct, API, direct, API,
... so both see the same load from others; medians are reported, and the API's greedy text is checked
against the direct output. Progress on stderr, JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.common import CpuMonitor, ProcessGroups, Swarm, log

KEY = "bench-key"


class _Stamps:
    """A generate streamer recording when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.puts = 0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts > 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _stream_stats(t0: float, times: list[float], tokens: int) -> dict:
    first, last = times[0], times[-1]
    return {"ttft_s": first - t0, "tokens": tokens, "tokens_per_s": (tokens - 1) / (last - first) if last > first else 0.0,
            "end_s": last - t0}  # fmt: skip


def direct_stream(model, ids: list[int], max_tokens: int, eos: int) -> tuple[dict, list[int]]:
    x = torch.tensor([ids])
    stamps = _Stamps()
    t0 = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                         suppress_tokens=[eos], streamer=stamps)  # fmt: skip
    new = out[0, len(ids) :].tolist()
    return _stream_stats(t0, stamps.times, len(new)), new


def api_stream(client, model_id: str, ids: list[int], max_tokens: int, eos: int) -> tuple[dict, str]:
    t0 = time.perf_counter()
    times, text, tokens = [], "", 0
    stream = client.completions.create(model=model_id, prompt=ids, max_tokens=max_tokens, temperature=0,
                                       logit_bias={str(eos): -100}, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
            text += chunk.choices[0].text
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return _stream_stats(t0, times, tokens), text


def concurrent(fn, prompts: list[list[int]]) -> tuple[dict, list]:
    """Run ``fn(prompt)`` for every prompt at once; per-stream medians and aggregate tokens/s."""
    results: list = [None] * len(prompts)

    def one(i):
        results[i] = fn(prompts[i])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stats = [r[0] for r in results]
    summary = {
        "ttft_s_median": statistics.median(s["ttft_s"] for s in stats),
        "ttft_s_max": max(s["ttft_s"] for s in stats),
        "per_stream_tokens_per_s_median": statistics.median(s["tokens_per_s"] for s in stats),
        "aggregate_tokens_per_s": sum(s["tokens"] for s in stats) / wall,
        "wall_s": wall,
    }
    return summary, [r[1] for r in results]


def start_api(groups, model: Path, initial_peers: list[str], dht_prefix: str, port: int):
    import urllib.request

    cmd = ["-m", "corolla.cli.api", str(model), "--initial_peers", *initial_peers, "--dht_prefix", dht_prefix,
           "--port", str(port), "--api_key", KEY, "--log_level", "WARNING"]  # fmt: skip
    proc = groups.start(cmd, "api")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"corolla api exited with {proc.returncode}; see {proc.log_path}")
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                             headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    raise TimeoutError("corolla api did not answer in 300 s")


def _median_of(runs: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}


def measure(model, client, model_id, tokenizer, prompts, args, eos, monitor) -> dict:
    out = {}
    for streams in args.streams:
        batch = prompts[:streams]
        direct_runs, api_runs, loads = [], [], []
        exact = True
        for _ in range(args.runs):
            monitor.start()
            d, d_tokens = concurrent(lambda p: direct_stream(model, p, args.max_tokens, eos), batch)
            a, a_texts = concurrent(lambda p: api_stream(client, model_id, p, args.max_tokens, eos), batch)
            loads.append(monitor.foreign_cores())
            direct_runs.append(d)
            api_runs.append(a)
            exact &= [tokenizer.decode(t, skip_special_tokens=True) for t in d_tokens] == a_texts
        direct, api = _median_of(direct_runs), _median_of(api_runs)
        out[str(streams)] = {
            "direct_model_generate": direct,
            "api_openai_stream": api,
            "api_vs_direct": {
                "ttft_ratio": round(api["ttft_s_median"] / direct["ttft_s_median"], 3),
                "ttft_added_ms": round(1000 * (api["ttft_s_median"] - direct["ttft_s_median"]), 2),
                "aggregate_tokens_per_s_ratio": round(
                    api["aggregate_tokens_per_s"] / direct["aggregate_tokens_per_s"], 3
                ),
            },
            "greedy_text_identical": exact,
            "others_cpu_cores_during_runs": round(statistics.median(loads), 3),
        }
        log(f"{streams} stream(s): {json.dumps(out[str(streams)]['api_vs_direct'])}")
    return out


def run(args, workdir: Path) -> dict:
    import openai
    from transformers import AutoTokenizer

    from corolla import AutoDistributedModelForCausalLM
    from corolla.cli.demo_checkpoint import ensure_demo_checkpoint
    from corolla.models.checkpoint import Checkpoint

    ckpt = Path(args.model) if args.model else ensure_demo_checkpoint(workdir / "cache")
    num_blocks = Checkpoint(str(ckpt)).config.num_hidden_layers
    half = num_blocks // 2
    prefix = "bench-api"
    groups = ProcessGroups(workdir)
    swarm = Swarm(groups)
    model = None
    try:
        swarm.start_dht()
        procs = [
            swarm.start_server("s0", ckpt, f"0:{half}", prefix),
            swarm.start_server("s1", ckpt, f"{half}:{num_blocks}", prefix),
        ]
        swarm.wait_online(procs, prefix, num_blocks)
        log("servers online; starting corolla api")
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        start_api(groups, ckpt, swarm.initial_peers, prefix, port)
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            ckpt, initial_peers=swarm.initial_peers, dht_prefix=prefix
        )
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=600)
        model_id = client.models.list().data[0].id
        vocab = model.config.vocab_size
        eos = tokenizer.eos_token_id
        gen = torch.Generator().manual_seed(0)
        prompts = [
            torch.randint(10, vocab, (args.prompt_tokens,), generator=gen).tolist()
            for _ in range(max(args.streams))
        ]
        log("warming up")
        direct_stream(model, prompts[0], 4, eos)
        api_stream(client, model_id, prompts[0], 4, eos)
        monitor = CpuMonitor()
        monitor.wait_quiet(max_wait=10.0)
        results = measure(model, client, model_id, tokenizer, prompts, args, eos, monitor)
        return {
            "bench": "api",
            "model": {"checkpoint": ckpt.name, "num_blocks": num_blocks, "hidden_size": model.config.hidden_size},
            "swarm": [f"0:{half}", f"{half}:{num_blocks}"],
            "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens,
            "runs_per_point (medians)": args.runs,
            "concurrent_streams": results,
        }
    finally:
        if model is not None:
            model.shutdown()
        swarm.close()
        groups.kill_all()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="checkpoint folder with a tokenizer (default: the demo checkpoint)"
    )
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--prompt_tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3, help="paired runs per concurrency (medians reported)")
    parser.add_argument("--workdir", default=None, help="keep the checkpoint and logs here (default: a temp dir)")
    parser.add_argument(
        "--streams", default="1,16", help="concurrent streams per measurement (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    args.streams = [int(s) for s in args.streams.split(",")]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="corolla-bench-api-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        out = run(args, workdir)
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
