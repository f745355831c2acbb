"""What a model family is to the rest of corolla: block geometry, block code and explicit HF name maps.

A `ModelFamily` (one per HF `model_type`, registered in `corolla.models.registry`) tells

- how to read a block's geometry from the HF config (`block_spec`, a frozen `BlockSpec`);
- how to build block `i` in plain torch (`make_block`);
- the explicit weight map of a block (`weight_map`): for each of our parameter names, the HF tensor
  names (relative to `block_prefix`) and their expected shapes, concatenated along dim 0 when several
  HF tensors feed one fused parameter (q/k/v, gate/up);
- the HF names of the client-side tensors (embeddings, final norm, LM head) and the kinds of the
  client's norms (RMSNorm or LayerNorm; BLOOM's LayerNorm after the word embeddings);
- optionally: a rewrite of the assembled state (`transform_state`, for fused layouts that interleave
  heads, like BLOOM's and Falcon's query_key_value) and a per-head positional bias (ALiBi) that
  replaces rotary embeddings (`position_bias`).

`assemble_state` turns loaded HF tensors into a block state dict, checking every shape and failing
loudly, with names, on anything missing. Unexpected tensors are found by the loader
(`BlockStack.load`), which compares the checkpoint's index against `hf_names`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from corolla.models.errors import CheckpointError

# our parameter name -> ((HF name relative to the block prefix, expected shape), ...)
WeightMap = dict[str, tuple[tuple[str, tuple[int, ...]], ...]]


@dataclass(frozen=True)
class BlockSpec:
    """The geometry of one decoder block, read from an HF config by the family."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # None = full attention
    qk_norm: bool = False  # RMSNorm over head_dim on every query and key head (Qwen3)


@dataclass(frozen=True)
class ModelFamily:
    """One HF `model_type`: its block code and its explicit HF tensor names."""

    model_type: str
    block_spec: Callable[[object, int], BlockSpec]  # (config, block index) -> spec
    make_block: Callable[..., nn.Module]  # (spec, *, dtype, device) -> block
    weight_map: Callable[[BlockSpec], WeightMap]
    check_config: Callable[[object], None] = lambda config: None
    block_prefix: str = "model.layers.{index}."
    # the causal-LM class's prefix of the base model's tensors; checkpoints saved from the bare base model
    # lack it (see `Checkpoint.use_prefix`)
    base_prefix: str = "model."
    embed_name: str = "model.embed_tokens.weight"
    norm_name: str = "model.norm.weight"
    lm_head_name: str = "lm_head.weight"
    # tensors some checkpoints carry that hold no weights (old Llama exports saved rotary buffers)
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    # (spec, assembled state) -> state: reorders fused HF layouts (BLOOM's per-head q/k/v) into ours
    transform_state: Callable[[BlockSpec, dict], dict] | None = None
    # config -> per-head key bias (ALiBi) or None; a family with a bias has no rotary embedding
    position_bias: Callable[[object], Callable | None] = lambda config: None
    # client side: final norm kind ("rms": weight only; "layer": LayerNorm with weight and bias) and
    # its epsilon; the LayerNorm after the word embeddings (BLOOM), by HF name prefix, if any
    norm_kind: str = "rms"
    norm_eps: Callable[[object], float] = lambda config: config.rms_norm_eps
    embed_norm_prefix: str | None = None

    def prefix(self, index: int) -> str:
        return self.block_prefix.format(index=index)

    def hf_names(self, config, index: int) -> list[str]:
        """Every HF tensor name that block `index` needs."""
        prefix = self.prefix(index)
        mapping = self.weight_map(self.block_spec(config, index))
        return [prefix + name for parts in mapping.values() for name, _ in parts]

    def is_ignored(self, name: str) -> bool:
        return name.endswith(self.ignored_suffixes)

    def client_names(self, config) -> dict[str, str]:
        """`ClientHead` parameter name -> HF name; no `lm_head.weight` when embeddings are tied."""
        names = {"embed_tokens.weight": self.embed_name, "norm.weight": self.norm_name}
        if self.norm_kind == "layer":
            names["norm.bias"] = self.norm_name.removesuffix("weight") + "bias"
        if self.embed_norm_prefix is not None:
            names["embed_tokens.norm.weight"] = self.embed_norm_prefix + "weight"
            names["embed_tokens.norm.bias"] = self.embed_norm_prefix + "bias"
        if not tied_embeddings(config):
            names["lm_head.weight"] = self.lm_head_name
        return names


def tied_embeddings(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def assemble_state(mapping: WeightMap, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Build a block state dict from HF tensors, checking names and every shape."""
    missing = [prefix + name for parts in mapping.values() for name, _ in parts if prefix + name not in tensors]
    if missing:
        raise CheckpointError(f"missing tensors: {', '.join(missing)}")
    state = {}
    for ours, parts in mapping.items():
        pieces = []
        for name, shape in parts:
            tensor = tensors[prefix + name]
            if tuple(tensor.shape) != tuple(shape):
                raise CheckpointError(
                    f"tensor {prefix + name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
                )
            pieces.append(tensor)
        state[ours] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
    return state
