"""The Mixtral decoder block: Mistral attention plus a sparse mixture of experts, all on the server.

`SparseMoE` follows transformers' `MixtralSparseMoeBlock` exactly: router logits in the activation
dtype, softmax in fp32, top-k, the k weights renormalised to sum to 1; each token's output is the
weighted sum of its k experts (SwiGLU MLPs, `GatedMLP`), experts visited in index order and their
weighted outputs (fp32 weights times activation-dtype outputs, cast back) accumulated with
`index_add_`, as transformers does, so half precision rounds the same way. Each expert is its own
pair of `nn.Linear` (fused gate/up, down), so weight quantization and adapters see ordinary linears;
the router (`router`, experts x hidden) stays in full precision under quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from corolla.models.cache import LayerCache
from corolla.models.family import BlockSpec, WeightMap
from corolla.models.layers import Attention, AttentionInputs, GatedMLP, RMSNorm


@dataclass(frozen=True)
class MoESpec(BlockSpec):
    num_experts: int = 8
    experts_per_token: int = 2


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, *, dtype=None, device=None):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=False, dtype=dtype, device=device)
        self.experts = nn.ModuleList(
            GatedMLP(hidden, intermediate, dtype=dtype, device=device) for _ in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] (tokens as rows) -> [N, hidden]."""
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for expert_index in chosen.unique().tolist():  # ascending, like transformers' loop
            token, slot = torch.where(chosen == expert_index)
            expert_out = self.experts[expert_index](x[token]) * weights[token, slot, None]
            out.index_add_(0, token, expert_out.to(out.dtype))
        return out


class MixtralBlock(nn.Module):
    def __init__(self, spec: MoESpec, *, dtype=None, device=None):
        super().__init__()
        self.spec = spec
        factory = {"dtype": dtype, "device": device}
        self.input_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, **factory)
        self.attn = Attention(
            spec.hidden_size,
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            sliding_window=spec.sliding_window,
            **factory,
        )
        self.post_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, **factory)
        self.moe = SparseMoE(
            spec.hidden_size, spec.intermediate_size, spec.num_experts, spec.experts_per_token, **factory
        )

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), inputs, cache)
        return x + self.moe(self.post_norm(x))


def mixtral_weight_map(spec: MoESpec) -> WeightMap:
    """Our parameter -> HF tensors (relative to `model.layers.{i}.`); experts as saved by transformers
    (`block_sparse_moe.experts.{e}.w1` gate, `w3` up, `w2` down)."""
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
        "moe.router.weight": (("block_sparse_moe.gate.weight", (spec.num_experts, hidden)),),
    }
    for e in range(spec.num_experts):
        prefix = f"block_sparse_moe.experts.{e}."
        mapping[f"moe.experts.{e}.gate_up.weight"] = (
            (prefix + "w1.weight", (inter, hidden)),
            (prefix + "w3.weight", (inter, hidden)),
        )
        mapping[f"moe.experts.{e}.down.weight"] = ((prefix + "w2.weight", (hidden, inter)),)
    return mapping
