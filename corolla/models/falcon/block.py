"""The Falcon decoder block in plain torch (both layouts), and its explicit HF weight map.

Three shapes of block, as transformers' `FalconDecoderLayer` builds them from the config:

- **new decoder architecture** (Falcon-40B/180B, `new_decoder_architecture=True`): attention and MLP in
  parallel on the same input, each behind its own LayerNorm (`ln_attn`, `ln_mlp`), or behind one shared
  `input_layernorm` when `num_ln_in_parallel_attn == 1`; `out = x + attn + mlp`. GQA with
  `num_kv_heads` groups, fused `query_key_value` rows laid out `[group, (n_rep queries, k, v), head_dim]`;
- **old parallel** (Falcon-7B: `parallel_attn=True`): one `input_layernorm` feeds both; multi-query
  (`multi_query=True`: rows `[q heads, k, v]`) or full multi-head (rows `[head, (q|k|v), head_dim]`);
- **old sequential** (`parallel_attn=False`): `x + attn(ln1(x))`, then `+ mlp(ln2(...))`.

Fused layouts are reordered once at load time (`falcon_state`) into the shared `Attention`'s
`[q heads, k heads, v heads]` rows. Positions are rotary (Falcon's own, the Llama formula) or, with
`alibi=True`, Falcon's ALiBi variant (see `corolla.models.falcon.family`). `bias` puts biases on every
linear; the MLP is `dense_4h_to_h(act(dense_h_to_4h(x)))` with `activation` (default exact GELU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from corolla.models.bloom.block import heads_interleaved_to_blocked
from corolla.models.cache import LayerCache
from corolla.models.family import BlockSpec, WeightMap
from corolla.models.layers import Attention, AttentionInputs, PlainMLP

NEW, PARALLEL, SEQUENTIAL = "new", "parallel", "sequential"


@dataclass(frozen=True)
class FalconSpec(BlockSpec):
    layout: str = NEW  # NEW | PARALLEL | SEQUENTIAL
    num_norms: int = 2  # NEW only: 2 = ln_attn + ln_mlp, 1 = one shared input_layernorm
    qkv_layout: str = "grouped"  # "grouped" (new), "mqa" ([q..., k, v]), "interleaved" ([head, 3, d])
    activation: str = "gelu"


class FalconBlock(nn.Module):
    def __init__(self, spec: FalconSpec, *, dtype=None, device=None):
        super().__init__()
        self.spec = spec
        factory = {"dtype": dtype, "device": device}
        hidden, eps = spec.hidden_size, spec.rms_norm_eps
        self.attn = Attention(
            hidden,
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            qkv_bias=spec.qkv_bias,
            o_bias=spec.o_bias,
            **factory,
        )
        self.mlp = PlainMLP(hidden, spec.intermediate_size, spec.activation, bias=spec.mlp_bias, **factory)
        self.two_norms = spec.layout == NEW and spec.num_norms == 2
        if self.two_norms:
            self.ln_attn = nn.LayerNorm(hidden, eps=eps, **factory)
            self.ln_mlp = nn.LayerNorm(hidden, eps=eps, **factory)
        else:
            self.input_norm = nn.LayerNorm(hidden, eps=eps, **factory)
        if spec.layout == SEQUENTIAL:
            self.post_norm = nn.LayerNorm(hidden, eps=eps, **factory)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: LayerCache | None = None) -> torch.Tensor:
        if self.spec.layout == SEQUENTIAL:
            x = x + self.attn(self.input_norm(x), inputs, cache)
            return x + self.mlp(self.post_norm(x))
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_norm(x)
        attn_out = self.attn(attn_in, inputs, cache)
        return x + (self.mlp(mlp_in) + attn_out)  # transformers' order: (mlp + attn) + residual


def falcon_weight_map(spec: FalconSpec) -> WeightMap:
    """Our parameter -> HF tensors (relative to `transformer.h.{i}.`) with their shapes."""
    hidden, inter = spec.hidden_size, spec.intermediate_size
    qkv_out = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    mapping: WeightMap = {
        "attn.qkv.weight": (("self_attention.query_key_value.weight", (qkv_out, hidden)),),
        "attn.o.weight": (("self_attention.dense.weight", (hidden, spec.num_heads * spec.head_dim)),),
        "mlp.up.weight": (("mlp.dense_h_to_4h.weight", (inter, hidden)),),
        "mlp.down.weight": (("mlp.dense_4h_to_h.weight", (hidden, inter)),),
    }
    norms = {"ln_attn": "ln_attn", "ln_mlp": "ln_mlp"}
    if not (spec.layout == NEW and spec.num_norms == 2):
        norms = {"input_norm": "input_layernorm"}
    if spec.layout == SEQUENTIAL:
        norms["post_norm"] = "post_attention_layernorm"
    for ours, theirs in norms.items():
        mapping[f"{ours}.weight"] = ((f"{theirs}.weight", (hidden,)),)
        mapping[f"{ours}.bias"] = ((f"{theirs}.bias", (hidden,)),)
    if spec.qkv_bias:
        mapping["attn.qkv.bias"] = (("self_attention.query_key_value.bias", (qkv_out,)),)
        mapping["attn.o.bias"] = (("self_attention.dense.bias", (hidden,)),)
        mapping["mlp.up.bias"] = (("mlp.dense_h_to_4h.bias", (inter,)),)
        mapping["mlp.down.bias"] = (("mlp.dense_4h_to_h.bias", (hidden,)),)
    return mapping


def _grouped_to_blocked(tensor: torch.Tensor, num_kv: int, n_rep: int, head_dim: int) -> torch.Tensor:
    """Rows `[group, n_rep + 2, head_dim]` -> `[q heads (group-major), k heads, v heads]`."""
    rest = tensor.shape[1:]
    grouped = tensor.reshape(num_kv, n_rep + 2, head_dim, *rest)
    q = grouped[:, :n_rep].reshape(num_kv * n_rep * head_dim, *rest)
    k = grouped[:, n_rep].reshape(num_kv * head_dim, *rest)
    v = grouped[:, n_rep + 1].reshape(num_kv * head_dim, *rest)
    return torch.cat((q, k, v))


def falcon_state(spec: FalconSpec, state: dict) -> dict:
    for name in ("attn.qkv.weight", "attn.qkv.bias"):
        if name not in state or spec.qkv_layout == "mqa":  # mqa rows are already [q..., k, v]
            continue
        if spec.qkv_layout == "grouped":
            n_rep = spec.num_heads // spec.num_kv_heads
            state[name] = _grouped_to_blocked(state[name], spec.num_kv_heads, n_rep, spec.head_dim)
        else:
            state[name] = heads_interleaved_to_blocked(state[name], spec.num_heads, spec.head_dim).contiguous()
    return state
