"""Catching lying servers: detection probability vs overhead (corolla.client.verification).

    python -m bench.verification [--model tiny|mid] [--prefill 16] [--steps 32] [--reps 3] [--trials 30]
                                 [--fractions 0,0.05,0.25,1]

An in-process swarm (tests/fake_swarm.py: the production server stacks on the in-memory network, one process,
so the checks' forwards compete with the chain for the same cores, as on a busy machine) with two replicas of
each half of the model. Two parts, printed as one JSON document:

- ``overhead``: for verification off and each ``verify_fraction`` (runs interleaved, ``--reps`` times), a session
  of ``--prefill`` random hidden states then ``--steps`` timed one-token steps at batch 1: time to the prefill's
  result, decode tokens/s (median), checks per step and tokens re-run on other servers per generated token.
- ``detection``: a server of the first half that answers its prefill honestly and lies (1e-2 relative noise)
  from its ``--lie_from``-th step on; per fraction, ``--trials`` sessions: how many caught it within the session,
  the lying steps whose result reached the caller before (a caught step never does), against the expectation
  1 - (1 - fraction)^steps_lying.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import log, write_llama

MID = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
           num_key_value_heads=16, vocab_size=32000)  # fmt: skip


def make_swarm(path: Path, num_blocks: int):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from fake_swarm import FakeSwarm

    swarm = FakeSwarm(path, step_timeout_floor=2.0)
    half = num_blocks // 2
    swarm.add_server("a", 0, half, latency=0.01)  # the chain's servers (fastest announced)
    swarm.add_server("a2", 0, half, latency=0.05)  # their replicas
    swarm.add_server("b", half, num_blocks, latency=0.01)
    swarm.add_server("b2", half, num_blocks, latency=0.05)
    return swarm


class NoisyAfter:
    """Makes a stack lie (1e-2 relative noise per token) from its ``after``-th forward on."""

    def __init__(self, stack):
        self.after, self.calls = math.inf, 0
        self.forward, self.forward_segments = stack.forward, stack.forward_segments
        stack.forward = lambda h, *a: self.lie(self.forward(h, *a))
        stack.forward_segments = lambda segments, blocks=None: [
            self.lie(out) for out in self.forward_segments(segments, blocks)
        ]

    def lie(self, out: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.after:
            return out
        noise = torch.randn(out.shape)
        return out + 1e-2 * noise * out.norm(dim=-1, keepdim=True) / math.sqrt(out.shape[-1])


def add_liar(swarm, peer: str, start: int, end: int) -> NoisyAfter:
    from corolla.models.stack import BlockStack

    honest = swarm.stacks.pop((start, end))
    swarm.stacks[start, end] = stack = BlockStack.load(
        swarm.checkpoint, start, end, dtype=torch.float32, progress=False
    )
    swarm.add_server(peer, start, end, latency=0.0001)  # the fastest: the chain takes it
    swarm.stacks[start, end] = honest
    swarm.manager.bridge.run(swarm.manager.update(force=True))  # the client sees the new server now
    return NoisyAfter(stack)


def session_run(manager, hidden_size: int, prefill: int, steps: int, on_step=None) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, prefill + steps, hidden_size, generator=g)
    positions = torch.arange(prefill + steps)[None]
    mask = torch.ones(1, prefill + steps, dtype=torch.bool)
    with manager.open_session(max_length=prefill + steps) as session:
        t0 = time.perf_counter()
        session.step(x[:, :prefill], positions[:, :prefill], mask[:, :prefill])
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for t in range(prefill, prefill + steps):
            session.step(x[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1])
            if on_step is not None:
                on_step(t - prefill + 1)
        decode = time.perf_counter() - t1
    return {"ttft_s": ttft, "decode_tok_s": steps / decode}


def configure(manager, fraction: float | None) -> None:
    """Verification off (None) or on at ``fraction`` for the sessions opened next."""
    if fraction is None:
        manager.config = dataclasses.replace(manager.config, verify=False)
    else:
        manager.config = dataclasses.replace(manager.config, verify=True, verify_fraction=fraction)


def overhead(swarm, hidden_size: int, args, fractions: list[float]) -> dict:
    from corolla.client.verification import verifier_for

    stats = verifier_for(swarm.manager).stats
    modes: list[float | None] = [None, *fractions]
    runs: dict[str, list[dict]] = {str(m): [] for m in modes}
    for rep in range(args.reps):
        for mode in modes if rep % 2 == 0 else reversed(modes):
            configure(swarm.manager, mode)
            checks, tokens = stats.checks, stats.checked_tokens
            result = session_run(swarm.manager, hidden_size, args.prefill, args.steps)
            result["checks"] = stats.checks - checks
            result["checked_tokens"] = stats.checked_tokens - tokens
            runs[str(mode)].append(result)
            log(f"overhead rep {rep} fraction {mode}: {result}")
    off = statistics.median(r["decode_tok_s"] for r in runs["None"])
    table = {}
    for mode in modes:
        rs = runs[str(mode)]
        tok_s = statistics.median(r["decode_tok_s"] for r in rs)
        table["off" if mode is None else str(mode)] = {
            "decode_tok_s": round(tok_s, 1),
            "vs_off": round(tok_s / off, 3),
            "ttft_ms": round(1000 * statistics.median(r["ttft_s"] for r in rs), 1),
            "checks_per_session": statistics.mean(r["checks"] for r in rs),
            "rerun_tokens_per_generated_token": round(
                statistics.mean(r["checked_tokens"] for r in rs) / (args.prefill + args.steps), 2
            ),
        }
    return table


def detection(swarm, hidden_size: int, args, fractions: list[float]) -> dict:
    from corolla.client.verification import verifier_for

    stats = verifier_for(swarm.manager).stats
    liar = add_liar(swarm, "liar", 0, swarm.num_blocks // 2)
    steps_lying = args.steps - args.lie_from + 1
    table = {}
    for fraction in fractions:
        configure(swarm.manager, fraction)
        caught, exposed = 0, []
        for _ in range(args.trials):
            swarm.manager.policy.lift_ban("liar")
            liar.calls, liar.after = 0, args.lie_from  # the prefill and lie_from - 1 steps honest
            before = stats.detections
            seen: list[int] = []

            def on_step(step: int, seen=seen, before=before) -> None:
                if not seen and stats.detections > before:
                    seen.append(step)

            session_run(swarm.manager, hidden_size, args.prefill, args.steps, on_step)
            if seen:
                caught += 1
                exposed.append(seen[0] - args.lie_from)  # lying steps returned before the one caught
            else:
                exposed.append(steps_lying)
        table[str(fraction)] = {
            "trials": args.trials,
            "caught": caught,
            "detection_probability": round(caught / args.trials, 3),
            "expected": round(1 - (1 - fraction) ** steps_lying, 3),
            "mean_lying_steps_returned": round(statistics.mean(exposed), 2),
            "expected_lying_steps_returned": round(sum((1 - fraction) ** k for k in range(1, steps_lying + 1)), 2),
        }
        log(f"detection fraction {fraction}: {table[str(fraction)]}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="tiny",
        choices=["tiny", "mid"],
        help="tiny: hidden 256, 8 blocks; mid: hidden 1024, 16 blocks (default: %(default)s)",
    )
    parser.add_argument("--prefill", type=int, default=16, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=32, help="one-token steps per session (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved runs per mode (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=30, help="sessions per fraction (default: %(default)s)")
    parser.add_argument(
        "--lie_from",
        type=int,
        default=2,
        help="the liar's first lying step after the prefill (default: %(default)s)",
    )
    parser.add_argument(
        "--fractions", default="0,0.05,0.25,1", help="verify_fraction values (default: %(default)s)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fractions = [float(f) for f in args.fractions.split(",")]
    import logging

    logging.getLogger("corolla").setLevel(logging.ERROR)  # each detection logs a warning
    with tempfile.TemporaryDirectory() as tmp:
        overrides = MID if args.model == "mid" else {}
        path = write_llama(Path(tmp) / args.model, seed=0, **overrides)
        num_blocks = overrides.get("num_hidden_layers", 8)
        hidden_size = overrides.get("hidden_size", 256)
        swarm = make_swarm(path, num_blocks)
        try:
            t0 = time.perf_counter()
            result = {
                "model": args.model,
                "swarm": "in-process, two replicas per half; the chain takes the faster",
                "prefill": args.prefill,
                "steps": args.steps,
                "torch_threads": args.threads,
                "overhead": overhead(swarm, hidden_size, args, fractions),
                "detection": detection(swarm, hidden_size, args, fractions),
            }
            result["seconds"] = round(time.perf_counter() - t0, 1)
        finally:
            swarm.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
