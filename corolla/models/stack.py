"""`BlockStack`: a contiguous run of blocks [start, end) of one model, in plain torch.

This is what a server hosts. Public API::

    BlockStack.load(model_ref, start, end, *, dtype, device="cpu", revision=None, token=None,
                    cache_dir=None, progress=True) -> BlockStack
    BlockStack.from_config(config, start, end, *, dtype, device="cpu") -> BlockStack   # random init
    stack.kv_cache_shape(batch, max_length) -> (batch, num_kv_heads, max_length, head_dim)  # one block
    stack.cache_bytes_per_token() -> int             # one block, k + v, in the stack's dtype
    stack.allocate_cache(batch, max_length, blocks=None) -> list[LayerCache]   # zeroed, one per block
    stack(hidden, positions, attention_mask, caches=None, offset=0, blocks=None) -> hidden
    stack.forward_segments([Segment(hidden, positions, attention_mask, caches, offset), ...], blocks=None)
                                                     # several sessions' steps as one forward
    stack.quant_type                                 # "none", or what `corolla.models.quant` applied

Forward semantics (`hidden` [B, T, H] in the stack's dtype; `positions` [B, T] absolute position ids
of these T tokens; `attention_mask` [B, offset + T], True (or 1) = real token, False = padding, for
every key position so far): the new tokens' keys/values are written into `caches` (one per block run)
at [offset, offset + T); each token attends causally to cache indices <= its own, skipping padding; a
query always sees its own key, so padded rows stay finite (their values are meaningless). Without
caches the forward covers only these T tokens and `offset` must be 0. `blocks=(a, b)` runs an absolute
sub-range of [start, end). Rotary tables and masks are computed once per forward for all blocks; for
ALiBi families (`ModelFamily.position_bias`) the per-head bias, computed from `attention_mask` (key
positions among real tokens, as in transformers), is folded into the masks and `positions` is unused.

Notes for callers: `hidden` must already be in the stack's dtype and device (cast at the wire
boundary); the caches' batch must equal B, and one call has one `offset` for all rows, so rows of
one call are one session's (or equally advanced) sequences. Positions are the caller's business: for
left padding use transformers' `generate` convention (`cumsum(mask) - 1`, pads at 0, then last + 1
per new token). Replaying a span's history into a fresh cache with the same positions and mask gives
the same cache. Sliding windows count cache indices, as in transformers; caches still keep
`max_length` tokens. Works under autograd when `caches` is None (forward/backward for fine-tuning).

Loading reads the config, checks the family (`UnsupportedModelError` for an unknown `model_type`),
refuses checkpoints whose index lists tensors under these blocks' prefixes that the family's weight
map does not know (`CheckpointError` naming them), then reads only these blocks' tensors, checking
every shape. Blocks are built on the meta device and receive the loaded tensors by assignment, so a
stack never holds two copies of its weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from corolla.models.cache import LayerCache
from corolla.models.errors import CheckpointError
from corolla.models.family import ModelFamily, assemble_state
from corolla.models.layers import (
    AttentionInputs,
    RotaryEmbedding,
    SegmentedInputs,
    add_position_bias,
    attention_masks,
)
from corolla.models.registry import get_family, open_checkpoint


class BlockStack(nn.Module):
    """A contiguous run of blocks [start, end) of one model, in plain torch."""

    def __init__(self, config, start: int, end: int, family: ModelFamily, layers: list[nn.Module], device="cpu"):
        super().__init__()
        _check_range(config, start, end)
        if len(layers) != end - start:
            raise ValueError(f"got {len(layers)} blocks for range [{start}, {end})")
        self.config, self.start, self.end, self.family = config, start, end, family
        self.specs = [family.block_spec(config, index) for index in range(start, end)]
        self.layers = nn.ModuleList(layers)
        spec = self.specs[0]
        self.num_kv_heads, self.head_dim = spec.num_kv_heads, spec.head_dim
        self.n_rep = spec.num_heads // spec.num_kv_heads
        self.windows = [s.sliding_window for s in self.specs]
        self.quant_type = "none"  # set by `corolla.models.quant.quantize_stack`
        self.position_bias = family.position_bias(config)  # ALiBi families: no rotary
        self.rotary = None if self.position_bias else RotaryEmbedding.from_config(config, self.head_dim, device)

    @classmethod
    def from_config(cls, config, start: int, end: int, *, dtype: torch.dtype, device="cpu") -> BlockStack:
        """Randomly initialised blocks (for tests and benchmarks)."""
        family = get_family(config.model_type)
        family.check_config(config)
        _check_range(config, start, end)
        layers = [
            family.make_block(family.block_spec(config, i), dtype=dtype, device=device) for i in range(start, end)
        ]
        return cls(config, start, end, family, layers, device)

    @classmethod
    def load(
        cls,
        model_ref: str,
        start: int,
        end: int,
        *,
        dtype: torch.dtype,
        device="cpu",
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | None = None,
        progress: bool = True,
    ) -> BlockStack:
        """Load blocks [start, end) of a local folder or Hub repo, reading only their tensors."""
        checkpoint, family, config = open_checkpoint(
            model_ref, revision=revision, token=token, cache_dir=cache_dir
        )
        _check_range(config, start, end)
        names = {index: family.hf_names(config, index) for index in range(start, end)}
        _check_unexpected(checkpoint.weight_map, family, names)
        tensors = checkpoint.load_tensors(
            [n for block in names.values() for n in block], dtype=dtype, device=device, progress=progress
        )
        layers = []
        for index in range(start, end):
            spec = family.block_spec(config, index)
            layer = family.make_block(spec, dtype=dtype, device="meta")
            state = assemble_state(family.weight_map(spec), family.prefix(index), tensors)
            if family.transform_state is not None:
                state = family.transform_state(spec, state)
            layer.load_state_dict(state, strict=True, assign=True)
            layers.append(layer)
        return cls(config, start, end, family, layers, device)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def kv_cache_shape(self, batch: int, max_length: int) -> tuple[int, ...]:
        """Shape of `LayerCache.k` (and `.v`) for one block."""
        return (batch, self.num_kv_heads, max_length, self.head_dim)

    def cache_bytes_per_token(self) -> int:
        """Bytes of k + v for one token of one block, in this stack's dtype."""
        return 2 * self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def allocate_cache(
        self, batch: int, max_length: int, blocks: tuple[int, int] | None = None
    ) -> list[LayerCache]:
        """Zeroed caches, one per block of `blocks` (default: all of [start, end))."""
        first, last = self._block_range(blocks)
        shape = self.kv_cache_shape(batch, max_length)
        return [LayerCache.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(first, last)]

    def _block_range(self, blocks: tuple[int, int] | None) -> tuple[int, int]:
        if blocks is None:
            return self.start, self.end
        first, last = blocks
        if not self.start <= first < last <= self.end:
            raise ValueError(f"blocks {blocks} is not a non-empty sub-range of [{self.start}, {self.end})")
        return first, last

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor,
        caches: list[LayerCache] | None = None,
        offset: int = 0,
        blocks: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        first, last = self._block_range(blocks)
        inputs = self._attention_inputs(hidden, positions, attention_mask, caches, offset, (first, last))
        rows = hidden.reshape(-1, hidden.shape[-1])
        for i, layer in enumerate(self.layers[first - self.start : last - self.start]):
            rows = layer(rows, inputs, None if caches is None else caches[i])
        return rows.view(hidden.shape)

    def forward_segments(
        self, segments: list[Segment], blocks: tuple[int, int] | None = None
    ) -> list[torch.Tensor]:
        """Several independent sequences (e.g. different sessions' steps) through blocks ``blocks`` as one
        forward: each :class:`Segment` is what :meth:`forward` takes, with its own caches and offset; the
        rows of all segments share each projection and MLP, attention runs per segment. Returns each
        segment's output, as :meth:`forward` would (up to matmul rounding)."""
        first, last = self._block_range(blocks)
        inputs = SegmentedInputs.of([self._attention_inputs(*segment, (first, last)) for segment in segments])
        rows = torch.cat([segment.hidden.reshape(-1, segment.hidden.shape[-1]) for segment in segments])
        for i, layer in enumerate(self.layers[first - self.start : last - self.start]):
            rows = layer(rows, inputs, [None if s.caches is None else s.caches[i] for s in segments])
        sizes = [segment.hidden.shape[0] * segment.hidden.shape[1] for segment in segments]
        return [out.view(s.hidden.shape) for out, s in zip(rows.split(sizes), segments, strict=True)]

    def _attention_inputs(
        self, hidden, positions, attention_mask, caches, offset: int, blocks: tuple[int, int]
    ) -> AttentionInputs:
        """Rotary tables and masks of one forward, shared by all its blocks."""
        first, last = blocks
        batch, length, _ = hidden.shape
        _check_step(hidden, positions, attention_mask, caches, offset, last - first)
        cos, sin = self.rotary(positions, hidden.dtype) if self.rotary is not None else (None, None)
        windows = set(self.windows[first - self.start : last - self.start])
        masks = attention_masks(attention_mask, offset, length, windows, self.n_rep, hidden.dtype)
        if self.position_bias is not None:
            bias = self.position_bias(attention_mask, hidden.dtype)
            masks = {w: add_position_bias(m, bias, self.n_rep, length) for w, m in masks.items()}
        return AttentionInputs(cos, sin, masks, offset, batch, length)


class Segment(NamedTuple):
    """One sequence of a :meth:`BlockStack.forward_segments` batch: :meth:`BlockStack.forward`'s arguments."""

    hidden: torch.Tensor
    positions: torch.Tensor
    attention_mask: torch.Tensor
    caches: list[LayerCache] | None
    offset: int


def _check_range(config, start: int, end: int) -> None:
    if not 0 <= start < end <= config.num_hidden_layers:
        raise ValueError(f"block range [{start}, {end}) is not within [0, {config.num_hidden_layers})")


def _check_step(hidden, positions, attention_mask, caches, offset: int, num_blocks: int) -> None:
    batch, length, _ = hidden.shape
    if tuple(positions.shape) != (batch, length):
        raise ValueError(f"positions has shape {tuple(positions.shape)}, expected {(batch, length)}")
    if tuple(attention_mask.shape) != (batch, offset + length):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, offset + length)}"
        )
    if caches is None:
        if offset != 0:
            raise ValueError("offset must be 0 without caches")
        return
    if len(caches) != num_blocks:
        raise ValueError(f"got {len(caches)} caches for {num_blocks} blocks")
    k = caches[0].k
    if k.shape[0] != batch or offset + length > k.shape[2]:
        raise ValueError(
            f"cache of batch {k.shape[0]} and max length {k.shape[2]} cannot take batch {batch} "
            f"at [{offset}, {offset + length})"
        )


def _check_unexpected(weight_map: dict[str, str], family: ModelFamily, names: dict[int, list[str]]) -> None:
    """Fail on checkpoint tensors under these blocks' prefixes that the family's weight map does not use."""
    prefixes = tuple(family.prefix(index) for index in names)
    expected = {n for block in names.values() for n in block}
    unexpected = sorted(
        n for n in weight_map if n.startswith(prefixes) and n not in expected and not family.is_ignored(n)
    )
    if unexpected:
        raise CheckpointError(
            f"checkpoint has tensors the {family.model_type} weight map does not know: {', '.join(unexpected)}"
        )
