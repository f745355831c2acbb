"""The BLOOM decoder block in plain torch, and its explicit HF weight map.

`x -> ln1 -> attention (ALiBi, no rotary) -> + residual -> ln2 -> MLP (BLOOM's tanh GELU) -> + residual`,
LayerNorms with bias, biases on every linear. With `apply_residual_connection_post_layernorm` the
residuals are the LayerNorm outputs instead of the block's inputs (as transformers does).

BLOOM's fused `query_key_value` interleaves heads (rows `[head, (q|k|v), head_dim]`); `bloom_state`
reorders those rows once at load time into the shared `Attention`'s `[q heads, k heads, v heads]`
layout, so the block runs on the shared layers unchanged. The ALiBi bias is added to the masks by
`BlockStack` (see `corolla.models.layers.AlibiBias`); the LayerNorm after the word embeddings is the
client's (`ClientHead`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from corolla.models.cache import LayerCache
from corolla.models.family import BlockSpec, WeightMap
from corolla.models.layers import Attention, AttentionInputs, PlainMLP


@dataclass(frozen=True)
class BloomSpec(BlockSpec):
    residual_post_layernorm: bool = False


class BloomBlock(nn.Module):
    def __init__(self, spec: BloomSpec, *, dtype=None, device=None):
        super().__init__()
        self.spec = spec
        factory = {"dtype": dtype, "device": device}
        hidden = spec.hidden_size
        self.input_norm = nn.LayerNorm(hidden, eps=spec.rms_norm_eps, **factory)
        self.attn = Attention(
            hidden, spec.num_heads, spec.num_kv_heads, spec.head_dim, qkv_bias=True, o_bias=True, **factory
        )
        self.post_norm = nn.LayerNorm(hidden, eps=spec.rms_norm_eps, **factory)
        self.mlp = PlainMLP(hidden, spec.intermediate_size, "bloom_gelu", bias=True, **factory)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: LayerCache | None = None) -> torch.Tensor:
        normed = self.input_norm(x)
        residual = normed if self.spec.residual_post_layernorm else x
        x = self.attn(normed, inputs, cache) + residual
        normed = self.post_norm(x)
        residual = normed if self.spec.residual_post_layernorm else x
        return self.mlp(normed) + residual


def bloom_weight_map(spec: BloomSpec) -> WeightMap:
    """Our parameter -> HF tensors (relative to `transformer.h.{i}.`) with their shapes."""
    hidden, inter = spec.hidden_size, spec.intermediate_size
    return {
        "input_norm.weight": (("input_layernorm.weight", (hidden,)),),
        "input_norm.bias": (("input_layernorm.bias", (hidden,)),),
        "attn.qkv.weight": (("self_attention.query_key_value.weight", (3 * hidden, hidden)),),
        "attn.qkv.bias": (("self_attention.query_key_value.bias", (3 * hidden,)),),
        "attn.o.weight": (("self_attention.dense.weight", (hidden, hidden)),),
        "attn.o.bias": (("self_attention.dense.bias", (hidden,)),),
        "post_norm.weight": (("post_attention_layernorm.weight", (hidden,)),),
        "post_norm.bias": (("post_attention_layernorm.bias", (hidden,)),),
        "mlp.up.weight": (("mlp.dense_h_to_4h.weight", (inter, hidden)),),
        "mlp.up.bias": (("mlp.dense_h_to_4h.bias", (inter,)),),
        "mlp.down.weight": (("mlp.dense_4h_to_h.weight", (hidden, inter)),),
        "mlp.down.bias": (("mlp.dense_4h_to_h.bias", (hidden,)),),
    }


def heads_interleaved_to_blocked(tensor: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Rows `[head, 3, head_dim]` (q/k/v per head) -> `[3, head, head_dim]` (all q, all k, all v)."""
    rest = tensor.shape[1:]
    return tensor.reshape(num_heads, 3, head_dim, *rest).transpose(0, 1).reshape(3 * num_heads * head_dim, *rest)


def bloom_state(spec: BloomSpec, state: dict) -> dict:
    for name in ("attn.qkv.weight", "attn.qkv.bias"):
        state[name] = heads_interleaved_to_blocked(state[name], spec.num_heads, spec.head_dim).contiguous()
    return state
