"""Training through a 3-server loopback swarm vs the same training locally, same checkpoint, same run.

    python -m bench.finetune [--model mid|tiny] [--modes ptune,deep_ptune,lora] [--steps 3] [--batch 4] [--seq 64]

Prints one JSON document on stdout (progress on stderr). For each mode, the same training (the same model
class, initial trainable parameters, batches and SGD optimizer) runs twice:

- **local**: corolla's client model on an in-process ``LocalChain`` (the same blocks, frozen, no network),
  with the faster of 1 and 2 torch threads (one step each, measured before any server starts);
- **swarm**: the client model on a swarm of 3 servers splitting the blocks (disjoint spans, 3 hops, each
  ``--num_threads 1``), the client process with the local run's thread count (its head works while the
  servers wait); each server keeps a forward's autograd graph for its backward
  (``corolla.server.saved_graphs``), so the swarm computes what the local run does.

The two runs alternate step by step (local, swarm, local, swarm, ...), so both see the same machine load. Each
reports steps/s and tokens/s (batch x sequence per step) over ``--steps`` timed steps after one warm-up step,
the CPU others used during each step (the machine is shared), and the largest difference between the two
runs' trainable parameters at the end (the same training must give the same result). ``ratio`` is swarm over
local steps/s (also the median of the per-step ratios); the target is >= 1.0.

Modes are entries of :data:`MODES`: a function that builds the client model for a checkpoint on a given chain
(or swarm peers) and returns it with its trainable parameters. Adding a mode (e.g. client LoRA) is one entry.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import CpuMonitor, ProcessGroups, Swarm, log, write_llama
from bench.report import dumps, rounded
from bench.workload import MODELS, chain_spans

PRE_SEQ_LEN = 8
LR = 10.0
TARGET = 1.0
SERVERS = 3


def _ptune_model(mode: str) -> Callable:
    def build(ckpt: Path, *, chain=None, initial_peers=None):
        from corolla.client.model import AutoDistributedModelForCausalLM

        options = {"chain": chain} if chain is not None else {"initial_peers": initial_peers}
        model = AutoDistributedModelForCausalLM.from_pretrained(
            ckpt, tuning_mode=mode, pre_seq_len=PRE_SEQ_LEN, **options
        )
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            for p in model.ptune.parameters():  # non-zero deep prompts too, so that they matter
                p.normal_(0, 0.02)
        return model, [p for p in model.parameters() if p.requires_grad]

    return build


LORA_RANK = 8
LORA_LR = 0.5


def _lora_model(ckpt: Path, *, chain=None, initial_peers=None):
    """Client-owned LoRA (rank 8, every target) over frozen blocks; B starts non-zero so A's gradients matter."""
    from corolla.client.lora import RemoteLora
    from corolla.client.model import AutoDistributedModelForCausalLM

    options = {"chain": chain} if chain is not None else {"initial_peers": initial_peers}
    model = AutoDistributedModelForCausalLM.from_pretrained(ckpt, **options)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)  # the same initial LoRA for the local and the swarm run
        lora = RemoteLora.attach(model, r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=targets)
        for name, p in lora.params.items():
            if name.endswith("__B"):
                p.normal_(0, 0.02)
    model.bench_lr = LORA_LR
    return model, list(lora.parameters())


#: mode -> build(ckpt, chain=..., initial_peers=...) -> (model, trainable parameters); a model may carry its
#: own SGD learning rate as ``bench_lr``
MODES: dict[str, Callable] = {
    "ptune": _ptune_model("ptune"),
    "deep_ptune": _ptune_model("deep_ptune"),
    "lora": _lora_model,
}


def batches(vocab: int, batch: int, seq: int, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (batch, seq), generator=g) for _ in range(count)]


class Trainer:
    """One model's training: SGD steps on given batches, each timed, with the CPU others used meanwhile."""

    def __init__(self, model, params, threads: int, monitor: CpuMonitor):
        self.model, self.params, self.threads, self.monitor = model, params, threads, monitor
        # plain SGD: the update is proportional to the gradient, so a wrong gradient shows in the parameters
        # (Adam's first steps are nearly sign(gradient) and would hide it)
        self.optimizer = torch.optim.SGD(params, lr=getattr(model, "bench_lr", LR))
        self.initial = [p.detach().clone() for p in params]
        self.losses: list[float] = []
        self.times: list[float] = []
        self.loads: list[float] = []

    def step(self, ids: torch.Tensor, timed: bool = True) -> float:
        torch.set_num_threads(self.threads)
        self.monitor.start()
        t0 = time.perf_counter()
        self.optimizer.zero_grad()
        loss = self.model(ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        seconds = time.perf_counter() - t0
        self.losses.append(loss.item())
        if timed:
            self.times.append(seconds)
            self.loads.append(self.monitor.foreign_cores())
        return seconds

    def result(self, tokens: int) -> dict:
        seconds = sum(self.times)
        return {
            "steps_per_s": len(self.times) / seconds,
            "tokens_per_s": tokens * len(self.times) / seconds,
            "step_s": [round(t, 3) for t in self.times],
            "losses": [round(x, 5) for x in self.losses],
            "others_cpu_cores": [round(x, 2) for x in self.loads],
            "threads": self.threads,
            "max_param_change": max(
                (p.detach() - q).abs().max().item() for p, q in zip(self.params, self.initial)
            ),
        }


def local_stack(ckpt: Path):
    from corolla.models.stack import BlockStack

    stack = BlockStack.load(str(ckpt), 0, MODELS_CONFIG["num_hidden_layers"], dtype=torch.float32, progress=False)
    return stack.requires_grad_(False)  # frozen, as on a server


def choose_local_threads(build, ckpt: Path, stack, data, monitor: CpuMonitor) -> dict:
    """Seconds of one step with 1 and 2 torch threads (after a warm-up step), before any server runs."""
    from corolla.client.local_chain import LocalChain

    seconds = {}
    for threads in (1, 2):
        model, params = build(ckpt, chain=LocalChain(stack))
        trainer = Trainer(model, params, threads, monitor)
        trainer.step(data[0], timed=False)
        seconds[threads] = trainer.step(data[1])
        log(f"  local step with {threads} thread(s): {seconds[threads]:.2f} s")
    torch.set_num_threads(1)
    return seconds


def paired_runs(build, ckpt: Path, stack, initial_peers, data, local_threads: int, monitor: CpuMonitor):
    """The same training locally and through the swarm, step by step alternately, so both see the same load."""
    from corolla.client.local_chain import LocalChain

    local = Trainer(*build(ckpt, chain=LocalChain(stack)), local_threads, monitor)
    remote = Trainer(*build(ckpt, initial_peers=initial_peers), local_threads, monitor)
    try:
        local.step(data[0], timed=False)
        remote.step(data[0], timed=False)
        for i, ids in enumerate(data[1:], 1):
            a, b = local.step(ids), remote.step(ids)
            log(f"  step {i}: local {a:.2f} s, swarm {b:.2f} s")
        diff = max((a - b).abs().max().item() for a, b in zip(remote.params, local.params))
        return local, remote, diff
    finally:
        remote.model.shutdown()
        torch.set_num_threads(1)


MODELS_CONFIG: dict = {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="mid")
    parser.add_argument("--modes", default="ptune,lora", help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    spec = MODELS[args.model]
    MODELS_CONFIG.update(spec["config"])
    monitor = CpuMonitor()
    with tempfile.TemporaryDirectory(prefix="corolla-bench-ft-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        log(f"writing the {args.model} checkpoint")
        ckpt = write_llama(workdir / args.model, max_shard_size=spec["shard"], **spec["config"])
        data = batches(spec["config"]["vocab_size"], args.batch, args.seq, args.steps + 1)
        report = {
            "model": args.model,
            "config": spec["config"],
            "batch": args.batch,
            "seq": args.seq,
            "pre_seq_len": PRE_SEQ_LEN,
            "timed_steps": args.steps,
            "target_ratio": TARGET,
            "modes": {},
        }
        stack = local_stack(ckpt)
        log("local thread count (one step each, before any server starts)")
        by_threads = choose_local_threads(MODES[modes[0]], ckpt, stack, data, monitor)
        local_threads = min(by_threads, key=by_threads.get)
        report["local_step_s_by_threads"] = by_threads
        groups = ProcessGroups(workdir)
        swarm = Swarm(groups)
        try:
            swarm.start_dht()
            num_blocks = spec["config"]["num_hidden_layers"]
            spans = chain_spans(num_blocks, SERVERS)
            procs = [swarm.start_server(f"s{i}", ckpt, f"{a}:{b}", args.model) for i, (a, b) in enumerate(spans)]
            log(f"waiting for {SERVERS} servers")
            swarm.wait_online(procs, args.model, num_blocks)
            for mode in modes:
                log(f"{mode}: local and swarm training, alternating steps")
                local, remote, diff = paired_runs(
                    MODES[mode], ckpt, stack, swarm.initial_peers, data, local_threads, monitor
                )
                tokens = data[0].numel()
                ours, theirs = remote.result(tokens), local.result(tokens)
                ratio = sum(local.times) / sum(remote.times)
                pair_ratios = sorted(a / b for a, b in zip(local.times, remote.times))
                report["modes"][mode] = {
                    "local": theirs,
                    "swarm": {**ours, "servers": SERVERS, "spans": spans},
                    "ratio_swarm_vs_local": ratio,
                    "ratio_median_of_pairs": pair_ratios[len(pair_ratios) // 2],
                    "meets_target": ratio >= TARGET,
                    "max_param_diff_vs_local": diff,
                    "same_result": diff < 1e-4 * max(1.0, ours["max_param_change"]),
                }
                log(
                    f"  {mode}: swarm {ours['steps_per_s']:.3f} steps/s, {ratio:.2f}x local; param diff {diff:.2e}"
                )
        finally:
            swarm.close()
            groups.kill_all()
    out = rounded(report)
    for mode, result in report["modes"].items():  # tiny numbers that 3 decimals would zero
        for key in ("max_param_diff_vs_local",):
            out["modes"][mode][key] = float(f"{result[key]:.3e}")
        for side in ("local", "swarm"):
            out["modes"][mode][side]["max_param_change"] = float(f"{result[side]['max_param_change']:.3e}")
    print(dumps(out))


if __name__ == "__main__":
    main()
