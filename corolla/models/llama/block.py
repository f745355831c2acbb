"""The Llama decoder block in plain torch, and its explicit HF weight map.

Pre-norm residual block: `x + attn(norm(x))`, then `x + mlp(norm(x))`, on the shared layers of
`corolla.models.layers`. The same block serves Mistral (sliding window) and Qwen2 (q/k/v bias): the
differences are in the `BlockSpec` their families read from the config (`corolla.models.llama.family`).
"""

from __future__ import annotations

import torch
from torch import nn

from corolla.models.cache import LayerCache
from corolla.models.family import BlockSpec, WeightMap
from corolla.models.layers import Attention, AttentionInputs, GatedMLP, RMSNorm


class LlamaBlock(nn.Module):
    def __init__(self, spec: BlockSpec, *, dtype=None, device=None):
        super().__init__()
        self.spec = spec
        factory = {"dtype": dtype, "device": device}
        self.input_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, **factory)
        self.attn = Attention(
            spec.hidden_size,
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            qkv_bias=spec.qkv_bias,
            o_bias=spec.o_bias,
            sliding_window=spec.sliding_window,
            qk_norm_eps=spec.rms_norm_eps if spec.qk_norm else None,
            **factory,
        )
        self.post_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, **factory)
        self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias, **factory)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: LayerCache | None = None) -> torch.Tensor:
        """x [B * T, hidden] (tokens as rows, see `corolla.models.layers`) -> same shape."""
        x = x + self.attn(self.input_norm(x), inputs, cache)
        return x + self.mlp(self.post_norm(x))


def llama_weight_map(spec: BlockSpec) -> WeightMap:
    """Our parameter -> HF tensors (relative to `model.layers.{i}.`) with their shapes, in concat order."""
    hidden, inter = spec.hidden_size, spec.intermediate_size
    q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    mapping: WeightMap = {
        "input_norm.weight": (("input_layernorm.weight", (hidden,)),),
        "attn.qkv.weight": (
            ("self_attn.q_proj.weight", (q_out, hidden)),
            ("self_attn.k_proj.weight", (kv_out, hidden)),
            ("self_attn.v_proj.weight", (kv_out, hidden)),
        ),
        "attn.o.weight": (("self_attn.o_proj.weight", (hidden, q_out)),),
        "post_norm.weight": (("post_attention_layernorm.weight", (hidden,)),),
        "mlp.gate_up.weight": (("mlp.gate_proj.weight", (inter, hidden)), ("mlp.up_proj.weight", (inter, hidden))),
        "mlp.down.weight": (("mlp.down_proj.weight", (hidden, inter)),),
    }
    if spec.qkv_bias:
        mapping["attn.qkv.bias"] = (
            ("self_attn.q_proj.bias", (q_out,)),
            ("self_attn.k_proj.bias", (kv_out,)),
            ("self_attn.v_proj.bias", (kv_out,)),
        )
    if spec.qk_norm:
        mapping["attn.q_norm.weight"] = (("self_attn.q_norm.weight", (spec.head_dim,)),)
        mapping["attn.k_norm.weight"] = (("self_attn.k_norm.weight", (spec.head_dim,)),)
    if spec.o_bias:
        mapping["attn.o.bias"] = (("self_attn.o_proj.bias", (hidden,)),)
    if spec.mlp_bias:
        mapping["mlp.gate_up.bias"] = (("mlp.gate_proj.bias", (inter,)), ("mlp.up_proj.bias", (inter,)))
        mapping["mlp.down.bias"] = (("mlp.down_proj.bias", (hidden,)),)
    return mapping
