"""Shared plain-torch layers for decoder blocks: RMSNorm, rotary, ALiBi, GQA attention, gated and plain MLPs.

Decisions:

- **Fused projections.** q/k/v are one `nn.Linear` (`qkv`) and gate/up are one (`gate_up`): one matmul
  instead of three (two) per block, which matters for the per-token step. Families' weight maps
  concatenate the HF tensors into them (see `corolla.models.family.WeightMap`).
- **Tokens as rows.** Blocks see activations as 2-D `[B * T, H]`: `nn.Linear` on 2-D input is one
  `addmm`, about half the dispatch cost of the 3-D path on a one-token step (measured on CPU).
- **Batches of sessions.** A server runs the waiting steps of several sessions as one forward
  (`SegmentedInputs`): the rows of all sessions go through each projection and MLP together (one read of
  the weights for all), and attention runs per session, against its own cache, offset and mask.
- **Computed once per forward.** `RotaryEmbedding` returns cos/sin for the positions of a forward and
  `attention_masks` builds its masks; the caller (`BlockStack`) shares both among all blocks.
- **Rotary without `rotate_half`.** `rotate_half(x) * sin == x.roll(d/2) * [-sin, sin]` exactly (the
  negation is exact), so the sign is folded into the `sin` table once per forward: one op per block
  less. cos/sin are computed in fp32 then cast to the activation dtype, like transformers.
- **GQA by folding query heads** instead of repeating keys/values: queries of the `n_rep` heads that
  share a kv head become `n_rep * T` rows of that kv head, so SDPA runs with `num_kv_heads` heads and the
  cache is never copied or expanded, and no SDPA kernel needs `enable_gqa` support. The mask is
  repeated to match, once per forward (a one-token step needs no repeat: its mask broadcasts).
- **Explicit masks.** Row `t` of a forward at cache offset `o` is the token at cache index
  `o + t`; it sees key `j` when `j <= o + t`, `attention_mask[b, j]` is True and, for sliding-window
  layers, `j > o + t - window` (window counted on cache indices, like transformers). A query always
  sees its own key, so padded rows never produce NaN. The boolean masks are turned into additive
  ones (0 / -inf, activation dtype) once per forward: SDPA would otherwise convert them in every
  block (measured: ~25% of SDPA's time for a one-token step on CPU).
- **ALiBi** (BLOOM, Falcon with `alibi`) is a per-head additive bias on keys, folded into the additive
  masks once per forward (`AlibiBias`, `add_position_bias`); such families have no rotary tables
  (`AttentionInputs.cos`/`sin` are None). Qwen3's per-head q/k RMSNorm is an `Attention` option.
- **RMSNorm order** follows transformers (normalise in fp32, cast back, then multiply the weight) so
  that half-precision results match it as closely as possible; fp32 uses the one fused op.

Rope types: "default", "linear", "llama3" and "dynamic" (NTK; recomputed per forward from the largest
position in it, which is what transformers' stateful version computes during one growing generation;
as in transformers, keys cached before the sequence outgrew `max_position_embeddings` keep their old
frequencies, so incremental decoding past that length differs from a full forward).
Settings come from `config.rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from corolla.models.errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


def rope_parameters(config) -> dict:
    """The rope settings of `config` as one flat dict with at least `rope_type` and `rope_theta`."""
    params = getattr(config, "rope_parameters", None)
    if params:
        if any(isinstance(value, dict) for value in params.values()):
            raise UnsupportedModelError("per-layer-type rope_parameters are not supported")
        params = dict(params)
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] == "llama3":
        params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if factor not in (None, 1, 1.0):
        raise UnsupportedModelError(f"partial_rotary_factor={factor} is not supported")
    if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {params['rope_type']!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return params


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(params: dict, dim: int) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short kept, the band between blended."""
    inv_freq = _default_inv_freq(params["rope_theta"], dim)
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions; one instance serves every block of a stack."""

    def __init__(self, head_dim: int, params: dict, max_position_embeddings: int, device=None):
        super().__init__()
        self.head_dim = head_dim
        self.rope_type = params["rope_type"]
        self.params = params
        self.max_position_embeddings = max_position_embeddings
        if self.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(params, head_dim)
        else:
            inv_freq = _default_inv_freq(params["rope_theta"], head_dim)
            if self.rope_type == "linear":
                inv_freq = inv_freq / params["factor"]
        # stored doubled ([f, f], head_dim long) so that one multiply gives the full-width angles
        self.register_buffer("inv_freq", torch.cat((inv_freq, inv_freq)).to(device), persistent=False)
        half = head_dim // 2
        self.register_buffer("sign", torch.tensor([-1.0] * half + [1.0] * half, device=device), persistent=False)

    @classmethod
    def from_config(cls, config, head_dim: int, device=None) -> RotaryEmbedding:
        return cls(head_dim, rope_parameters(config), config.max_position_embeddings, device)

    def _dynamic_inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        seq_len = int(positions.max()) + 1
        if seq_len <= self.max_position_embeddings:
            return self.inv_freq
        factor, dim = self.params["factor"], self.head_dim
        base = self.params["rope_theta"] * ((factor * seq_len / self.max_position_embeddings) - (factor - 1)) ** (
            dim / (dim - 2)
        )
        inv_freq = _default_inv_freq(base, dim).to(self.inv_freq.device)
        return torch.cat((inv_freq, inv_freq))

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> (cos, signed sin), each [B, T, 1, head_dim] in `dtype`."""
        inv_freq = self._dynamic_inv_freq(positions) if self.rope_type == "dynamic" else self.inv_freq
        freqs = positions[..., None, None].float() * inv_freq
        return freqs.cos().to(dtype), (freqs.sin() * self.sign).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, d] rotated by the tables of `RotaryEmbedding.forward`."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 == self.weight.dtype:  # same result, one fused op
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def _bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """BLOOM's tanh GELU with its own rounded constants (transformers' `bloom_gelu_forward`)."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "bloom_gelu": _bloom_gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedModelError(
            f"activation {name!r} is not supported; supported: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


class PlainMLP(nn.Module):
    """down(act(up(x))): the two-matrix MLP of BLOOM and Falcon."""

    def __init__(self, hidden: int, intermediate: int, act: str, *, bias: bool, dtype=None, device=None):
        super().__init__()
        self.act_name = act
        self.act = activation(act)
        self.up = nn.Linear(hidden, intermediate, bias=bias, dtype=dtype, device=device)
        self.down = nn.Linear(intermediate, hidden, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (fp32): a geometric series for the largest power of two <= heads, then the
    odd powers of the next series for the remaining heads (the BLOOM paper's recipe)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


class AlibiBias:
    """Per-head additive attention bias `slope[h] * key_position` (ALiBi), keys numbered among real tokens.

    Softmax is invariant to a per-query constant, so biasing keys by their absolute position equals the
    relative form `slope * (key - query)`. Key positions come from the attention mask (`cumsum - 1`,
    padding at 0), as in transformers, so they cover cached keys too. `scale` divides the bias (Falcon's
    ALiBi variant divides by sqrt(head_dim)); `bf16_slopes` rounds the product in bfloat16 like Falcon.
    """

    def __init__(self, num_heads: int, *, scale: float = 1.0, bf16_slopes: bool = False):
        self.num_heads, self.scale, self.bf16_slopes = num_heads, scale, bf16_slopes
        self.slopes = alibi_slopes(num_heads)

    def __call__(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """attention_mask [B, S] -> bias [B, heads, S] in `dtype`."""
        mask = attention_mask.long()
        positions = ((mask.cumsum(-1) - 1) * mask)[:, None, :]
        slopes = self.slopes.to(attention_mask.device)[None, :, None]
        if self.bf16_slopes:
            slopes = slopes.bfloat16()
        bias = (slopes * positions).to(dtype)
        return bias / self.scale if self.scale != 1.0 else bias


def add_position_bias(mask: torch.Tensor, bias: torch.Tensor, n_rep: int, length: int) -> torch.Tensor:
    """Add a per-head key bias [B, heads, S] to an additive mask laid out for folded GQA queries
    ([B, 1, n_rep * T, S], or [B, 1, 1, S] for one token): head kv * n_rep + r gets rows r * T + t."""
    batch, heads, keys = bias.shape
    bias = bias.view(batch, heads // n_rep, n_rep, 1, keys)
    if length > 1:
        bias = bias.expand(batch, heads // n_rep, n_rep, length, keys)
    return mask + bias.reshape(batch, heads // n_rep, -1, keys)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one projection."""

    def __init__(self, hidden: int, intermediate: int, *, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=bias, dtype=dtype, device=device)
        self.down = nn.Linear(intermediate, hidden, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


@dataclass
class AttentionInputs:
    """What every block of one forward shares; built once by the caller."""

    cos: torch.Tensor | None  # [B, T, 1, head_dim]; None for families without rotary (ALiBi)
    sin: torch.Tensor | None  # [B, T, 1, head_dim], sign folded in (see module docstring)
    masks: dict  # sliding window (None = full) -> additive mask, see `attention_masks`
    offset: int  # cache index of the first of the T tokens
    batch: int  # B: blocks see activations as [B * T, H]
    length: int  # T


@dataclass
class SegmentedInputs:
    """A forward over several independent sequences (one server's batch of sessions): their rows are
    concatenated in this order, each segment with its own positions, masks, cache and offset."""

    segments: list[AttentionInputs]
    cos: torch.Tensor | None  # [rows, 1, head_dim]: the segments' tables concatenated (None without rotary)
    sin: torch.Tensor | None

    @classmethod
    def of(cls, segments: list[AttentionInputs]) -> SegmentedInputs:
        if segments[0].cos is None:
            return cls(segments, None, None)
        d = segments[0].cos.shape[-1]
        cos = torch.cat([s.cos.reshape(-1, 1, d) for s in segments])
        return cls(segments, cos, torch.cat([s.sin.reshape(-1, 1, d) for s in segments]))


def attention_masks(
    attention_mask: torch.Tensor, offset: int, length: int, windows, n_rep: int, dtype: torch.dtype = torch.bool
) -> dict[int | None, torch.Tensor]:
    """SDPA masks for each sliding window in `windows` (None = full attention).

    Shape [B, 1, n_rep * length, S] (or [B, 1, 1, S] for one token, which broadcasts over the grouped
    query rows). `dtype=torch.bool` gives True = visible; a floating dtype gives the additive form
    (0 visible, -inf hidden) that SDPA would otherwise compute from a boolean mask in every block.
    """
    valid = attention_mask.bool()
    keys = valid.shape[1]
    masks = {}
    for window in windows:
        if length == 1 and (window is None or window >= keys):
            # one new token: every real key is in the past; force its own key visible
            visible = valid.clone()
            visible[:, -1] = True
            visible = visible[:, None, None, :]
        else:
            visible = _visible(valid, offset, length, window)[:, None]
        if dtype != torch.bool:
            visible = torch.zeros(visible.shape, dtype=dtype, device=valid.device).masked_fill_(
                ~visible, -math.inf
            )
        if n_rep > 1 and length > 1:  # row r * T + t of the grouped queries is token t
            visible = visible.repeat(1, 1, n_rep, 1)
        masks[window] = visible
    return masks


def _visible(valid: torch.Tensor, offset: int, length: int, window: int | None) -> torch.Tensor:
    """[B, T, S]: causal (optionally windowed) and not padding, or the query's own key."""
    q_idx = torch.arange(offset, offset + length, device=valid.device)[:, None]
    k_idx = torch.arange(valid.shape[1], device=valid.device)[None, :]
    visible = k_idx <= q_idx
    if window is not None:
        visible &= k_idx > q_idx - window
    return (visible[None] & valid[:, None, :]) | (k_idx == q_idx)[None]


class Attention(nn.Module):
    """Causal self-attention with grouped kv heads, rotary positions and an optional preallocated cache."""

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        sliding_window: int | None = None,
        qk_norm_eps: float | None = None,
        dtype=None,
        device=None,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise UnsupportedModelError(f"{num_heads} heads cannot share {num_kv_heads} kv heads evenly")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.n_rep = num_heads // num_kv_heads
        self.sliding_window = sliding_window
        qkv_out = (num_heads + 2 * num_kv_heads) * head_dim
        self.qkv = nn.Linear(hidden, qkv_out, bias=qkv_bias, dtype=dtype, device=device)
        self.o = nn.Linear(num_heads * head_dim, hidden, bias=o_bias, dtype=dtype, device=device)
        # Qwen3: RMSNorm over head_dim of every query and key head, before rotary
        self.q_norm = self.k_norm = None
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, dtype=dtype, device=device)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs | SegmentedInputs, cache=None) -> torch.Tensor:
        """x [B * T, hidden] -> [B * T, hidden]. With :class:`SegmentedInputs` (a batch of independent
        sequences), ``cache`` is a list with one cache (or None) per segment: the projections run once over
        every row, the attention once per segment."""
        n_q, n_kv = self.num_heads, self.num_kv_heads
        qkv = self.qkv(x).view(x.shape[0], n_q + 2 * n_kv, self.head_dim)
        qk = qkv[:, : n_q + n_kv]  # [rows, heads + kv heads, d]: normed and rotated for all rows at once
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :n_q]), self.k_norm(qk[:, n_q:])), dim=1)
        if not isinstance(inputs, SegmentedInputs):
            if inputs.cos is not None:
                qk = apply_rotary(qk, inputs.cos.flatten(0, 1), inputs.sin.flatten(0, 1))
            return self.o(self._attend(qk, qkv[:, n_q + n_kv :], inputs, cache))
        if inputs.cos is not None:
            qk = apply_rotary(qk, inputs.cos, inputs.sin)
        outs, row = [], 0
        for segment, segment_cache in zip(inputs.segments, cache, strict=True):
            rows = slice(row, row + segment.batch * segment.length)
            outs.append(self._attend(qk[rows], qkv[rows, n_q + n_kv :], segment, segment_cache))
            row = rows.stop
        return self.o(torch.cat(outs))

    def _attend(self, qk: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, cache) -> torch.Tensor:
        """Rows [B * T, heads + kv heads, d] of rotated queries and keys and [B * T, kv heads, d] of values
        -> attention output [B * T, heads * d]."""
        batch, length = inputs.batch, inputs.length
        n_q, n_kv, n_rep = self.num_heads, self.num_kv_heads, self.n_rep
        qk = qk.view(batch, length, n_q + n_kv, self.head_dim)
        # [B, T, n_kv, n_rep, d] -> [B, n_kv, n_rep * T, d]: row r * T + t is head (kv * n_rep + r), token t
        q = qk[:, :, :n_q].view(batch, length, n_kv, n_rep, self.head_dim).permute(0, 2, 3, 1, 4)
        q = q.reshape(batch, n_kv, n_rep * length, self.head_dim)
        k = qk[:, :, n_q:].transpose(1, 2)
        v = v.view(batch, length, n_kv, self.head_dim).transpose(1, 2)
        if cache is not None:
            end = inputs.offset + length
            cache.k[:, :, inputs.offset : end] = k
            cache.v[:, :, inputs.offset : end] = v
            k, v = cache.k[:, :, :end], cache.v[:, :, :end]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.masks[self.sliding_window])
        out = out.view(batch, n_kv, n_rep, length, self.head_dim).permute(0, 3, 1, 2, 4)
        return out.reshape(batch * length, n_q * self.head_dim)
