"""LoRA on hosted blocks: PEFT-format adapters applied as a side path, chosen per forward.

A LoRA adapter adds ``scale * B(A(x))`` to the output of some linear layers of each block
(``A`` [r, in], ``B`` [out, r]; ``scale = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA). PEFT names the
layers by their HF module paths (``model.layers.3.self_attn.q_proj``); our blocks fuse q/k/v into one
``attn.qkv`` and gate/up into one ``mlp.gate_up``, so a LoRA on ``q_proj`` lands on a slice of the fused
output. Where each HF module lands (a :class:`LoraSite`) is derived from the family's explicit weight
map, which already says which HF tensors are concatenated, in which order, with which shapes: no
per-family LoRA table to keep in sync.

Decisions:

- **Never merged.** A server may serve several adapters and the base model at once, so base weights
  stay untouched: :func:`attach_lora` wraps each targetable linear in a :class:`LoraLinear` that calls
  the wrapped module (whatever it is: ``nn.Linear`` or a quantized module exposing ``in_features``/
  ``out_features``; its weight is never read) and adds the active adapter's delta.
- **Chosen per forward** with :func:`use_adapter` (a context variable, so each thread, e.g. the
  server's compute worker, sees its own choice); with no adapter active a wrapper costs one lookup.
- **Fused side path.** For one block and one fused module, the adapter's ``A`` matrices are stacked
  ([sum r, in]) and its ``B`` matrices (scale folded in) placed block-diagonally ([out, sum r], zero
  rows for slices without LoRA): two matmuls per module whatever the number of HF targets. The result
  equals PEFT's per-module sum up to float summation order. :func:`fuse_adapter` builds this from the
  per-target pairs with ordinary differentiable ops, so gradients reach client-owned ``A``/``B``.
- **PEFT files** are parsed and checked here (pure: dicts and tensors in, :class:`LoraAdapter` out):
  only ``peft_type`` LORA without DoRA, bias, fan-in-fan-out, per-module rank/alpha patterns or
  ``modules_to_save``; every tensor must be a known block's ``lora_A``/``lora_B`` with the shapes this
  model's geometry gives. Dropout is ignored (inference and deterministic training parity).
"""

from __future__ import annotations

import contextvars
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from corolla.models.family import BlockSpec, ModelFamily

#: PEFT saves a causal LM's adapter tensors under this prefix (then the HF module path).
PEFT_PREFIX = "base_model.model."


class LoraError(ValueError):
    """An adapter does not fit this model or uses a LoRA feature corolla does not support."""


@dataclass(frozen=True)
class LoraSite:
    """Where one HF linear (``self_attn.q_proj``) lives in our block: a slice of a fused module's output."""

    hf_name: str  # relative to the block prefix, e.g. "self_attn.q_proj"
    module: str  # our module path in the block, e.g. "attn.qkv"
    start: int  # output slice [start, stop) of `module`
    stop: int
    in_features: int
    #: row i of our slice is row ``row_order[i]`` of the HF weight (fused q/k/v that the family's
    #: ``transform_state`` reorders: BLOOM, Falcon); None = same order
    row_order: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def short_name(self) -> str:
        return self.hf_name.rsplit(".", 1)[-1]

    @property
    def out_features(self) -> int:
        return self.stop - self.start


def lora_sites(family: ModelFamily, spec: BlockSpec) -> dict[str, LoraSite]:
    """Every 2-D HF weight of a block, by HF module name, from the family's weight map.

    Where the family's ``transform_state`` reorders the rows of a fused q/k/v tensor at load (BLOOM's and
    Falcon's ``query_key_value``, PEFT's default target for them), the site carries that row order, and a
    LoRA ``B`` on it is reordered the same way (:func:`fuse_weights`).
    """
    sites = {}
    for ours, parts in family.weight_map(spec).items():
        if not ours.endswith(".weight") or any(len(shape) != 2 for _, shape in parts):
            continue
        order = _qkv_row_order(family, spec) if ours == "attn.qkv.weight" else None
        offset = 0
        for hf, shape in parts:
            name = hf.removesuffix(".weight")
            sites[name] = LoraSite(name, ours.removesuffix(".weight"), offset, offset + shape[0], shape[1], order)
            offset += shape[0]
    return sites


def _qkv_row_order(family: ModelFamily, spec: BlockSpec) -> torch.Tensor | None:
    """The permutation ``transform_state`` applies to the rows of a fused q/k/v weight (None if it keeps
    them), read off by transforming a tensor whose rows hold their own indices."""
    if family.transform_state is None:
        return None
    parts = family.weight_map(spec)["attn.qkv.weight"]
    if len(parts) != 1:  # separate HF q/k/v tensors: concatenated in order, never reordered
        return None
    index = torch.arange(parts[0][1][0], dtype=torch.float64)
    state = family.transform_state(
        spec, {"attn.qkv.weight": index[:, None].clone(), "attn.qkv.bias": index.clone()}
    )
    order = state["attn.qkv.weight"][:, 0].long()
    return None if torch.equal(order, torch.arange(len(order))) else order


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass
class LoraAdapter:
    """Per-block LoRA pairs of one adapter: ``weights[block][hf_name] = (A [r, in], B [out, r])``."""

    r: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    weights: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, self.use_rslora)

    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for block in self.weights.values() for a, b in block.values())

    def blocks(self, start: int, end: int) -> LoraAdapter:
        """The same adapter restricted to blocks [start, end)."""
        kept = {i: w for i, w in self.weights.items() if start <= i < end}
        return LoraAdapter(self.r, self.alpha, self.target_modules, self.use_rslora, kept)

    def peft_config(self, base_model: str = "") -> dict:
        """An ``adapter_config.json`` that PEFT's ``PeftModel.from_pretrained`` reads."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "target_modules": sorted(self.target_modules),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_dora": False,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": True,
            "init_lora_weights": True,
        }

    def peft_tensors(self, family: ModelFamily) -> dict[str, torch.Tensor]:
        """``adapter_model.safetensors`` tensors under PEFT's names."""
        out = {}
        for block, pairs in sorted(self.weights.items()):
            for name, (a, b) in sorted(pairs.items()):
                key = PEFT_PREFIX + family.prefix(block) + name
                out[key + ".lora_A.weight"] = a.detach().contiguous()
                out[key + ".lora_B.weight"] = b.detach().contiguous()
        return out


_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "rank_pattern": "per-module rank_pattern",
    "alpha_pattern": "per-module alpha_pattern",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters",
    "lora_bias": "lora_bias",
}
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


def target_short_names(family: ModelFamily, spec: BlockSpec) -> list[str]:
    return sorted({site.short_name for site in lora_sites(family, spec).values()})


def check_peft_config(config: dict, family: ModelFamily, model_config) -> None:
    """Refuse adapter configs this implementation cannot reproduce exactly, naming the setting."""
    if config.get("peft_type") != "LORA":
        raise LoraError(f"only LoRA adapters are supported, this one is peft_type {config.get('peft_type')!r}")
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise LoraError(f"{what} is not supported ({key}={config[key]!r})")
    if config.get("bias", "none") != "none":
        raise LoraError(f"LoRA bias={config['bias']!r} is not supported (only 'none')")
    if config.get("fan_in_fan_out"):
        raise LoraError("fan_in_fan_out adapters (GPT-2 style Conv1D) do not apply to this model")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise LoraError(f"r must be a positive int, got {config.get('r')!r}")
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)):
        known = set(target_short_names(family, family.block_spec(model_config, 0)))
        unknown = sorted(t for t in targets if t.rsplit(".", 1)[-1] not in known)
        if unknown:
            raise LoraError(
                f"target modules {unknown} are not in this model's blocks; supported: {', '.join(sorted(known))}"
            )


def parse_peft_adapter(
    config: dict,
    tensors: dict[str, torch.Tensor],
    family: ModelFamily,
    model_config,
    *,
    blocks: tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
) -> LoraAdapter:
    """A PEFT LoRA (config dict + safetensors tensors) as a :class:`LoraAdapter`, every tensor checked.

    ``blocks=(start, end)`` keeps only those blocks' tensors (a server loads only its own); tensors of
    other blocks are still checked by name.
    """
    check_peft_config(config, family, model_config)
    r, total = config["r"], model_config.num_hidden_layers
    targets = config["target_modules"]
    adapter = LoraAdapter(
        r=r,
        alpha=float(config.get("lora_alpha", r)),
        target_modules=tuple(targets) if isinstance(targets, (list, tuple)) else (str(targets),),
        use_rslora=bool(config.get("use_rslora", False)),
    )
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        block, name, part = _parse_key(key, family, total)
        halves.setdefault((block, name), {})[part] = tensor
    for (block, name), parts in sorted(halves.items()):
        site = lora_sites(family, family.block_spec(model_config, block)).get(name)
        if site is None:
            raise LoraError(f"adapter tensor for {family.prefix(block)}{name} targets no linear layer of a block")
        if set(parts) != {"A", "B"}:
            raise LoraError(
                f"adapter has lora_{next(iter(parts))} but not its pair for {family.prefix(block)}{name}"
            )
        a, b = parts["A"], parts["B"]
        if tuple(a.shape) != (r, site.in_features) or tuple(b.shape) != (site.out_features, r):
            raise LoraError(
                f"{family.prefix(block)}{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit this "
                f"model (expected {(r, site.in_features)} / {(site.out_features, r)} for r={r})"
            )
        if blocks is None or blocks[0] <= block < blocks[1]:
            cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
            adapter.weights.setdefault(block, {})[name] = (cast(a).contiguous(), cast(b).contiguous())
    if not halves:
        raise LoraError("adapter holds no LoRA tensors for this model's blocks")
    return adapter


def _parse_key(key: str, family: ModelFamily, total: int) -> tuple[int, str, str]:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight' -> (3, 'self_attn.q_proj', 'A')."""
    match = _KEY.match(key.removeprefix(PEFT_PREFIX))
    head, tail = family.block_prefix.split("{index}")
    if match is not None and match["module"].startswith(head):
        index, _, name = match["module"][len(head) :].partition(tail or ".")
        if index.isdigit() and name:
            if int(index) >= total:
                raise LoraError(f"adapter tensor {key} is for block {index}, the model has {total} blocks")
            return int(index), name, match["part"]
    raise LoraError(f"adapter tensor {key!r} is not a LoRA weight of a transformer block")


# --- applying an adapter ------------------------------------------------------------------------------

#: (block index, our module path) -> (A stacked [R, in], B block-diagonal with scale folded in [out, R])
FusedAdapter = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

_ACTIVE: contextvars.ContextVar[FusedAdapter | None] = contextvars.ContextVar("corolla_lora", default=None)


def fuse_adapter(adapter: LoraAdapter, family: ModelFamily, model_config) -> FusedAdapter:
    """The fused side-path tensors of ``adapter`` (see the module docstring)."""
    return fuse_weights(adapter.weights, adapter.scale, family, model_config)


def fuse_weights(weights, scale: float, family: ModelFamily, model_config) -> FusedAdapter:
    """Fused side-path tensors from per-block ``{hf_name: (A, B)}`` pairs; differentiable in A and B."""
    fused: FusedAdapter = {}
    for block, pairs in weights.items():
        by_module: dict[str, list[LoraSite]] = {}
        for site in lora_sites(family, family.block_spec(model_config, block)).values():
            by_module.setdefault(site.module, []).append(site)
        for module, sites in by_module.items():
            used = [s for s in sites if s.hf_name in pairs]
            if not used:
                continue
            a = torch.cat([pairs[s.hf_name][0] for s in used]) if len(used) > 1 else pairs[used[0].hf_name][0]
            rows = []
            for s in sorted(sites, key=lambda s: s.start):
                cols = []
                for u in used:
                    b = pairs[u.hf_name][1]
                    if u is s and s.row_order is not None:
                        b = b[s.row_order.to(b.device)]
                    cols.append(b * scale if u is s else b.new_zeros(s.out_features, b.shape[1]))
                rows.append(torch.cat(cols, dim=1) if len(cols) > 1 else cols[0])
            fused[(block, module)] = (a, torch.cat(rows) if len(rows) > 1 else rows[0])
    return fused


@contextmanager
def use_adapter(fused: FusedAdapter | None) -> Iterator[None]:
    """Make ``fused`` the adapter of every :class:`LoraLinear` forward in this thread (None = base model)."""
    token = _ACTIVE.set(fused)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_adapter() -> FusedAdapter | None:
    """The adapter :func:`use_adapter` made active in this context (None = base model)."""
    return _ACTIVE.get()


class LoraLinear(nn.Module):
    """A linear layer (any module with in/out features) plus the active adapter's LoRA delta, if any."""

    def __init__(self, base: nn.Module, block: int, module: str):
        super().__init__()
        self.base = base
        self.key = (block, module)
        self.in_features = base.in_features
        self.out_features = base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        fused = _ACTIVE.get()
        pair = None if fused is None else fused.get(self.key)
        if pair is None:
            return y
        a, b = pair
        return y + (x @ a.t()) @ b.t()


def attach_lora(stack: nn.Module) -> None:
    """Wrap every LoRA-targetable linear of a :class:`~corolla.models.stack.BlockStack` (idempotent)."""
    for offset, layer in enumerate(stack.layers):
        block = stack.start + offset
        for module in {site.module for site in lora_sites(stack.family, stack.specs[offset]).values()}:
            parent_name, _, attr = module.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            current = getattr(parent, attr)
            if not isinstance(current, LoraLinear):
                setattr(parent, attr, LoraLinear(current, block, module))
