"""The one KV-cache layout of corolla: one preallocated `LayerCache` per block and session.

`k` and `v` are `[batch, num_kv_heads, max_length, head_dim]` in the stack's dtype, written in place at
`[offset, offset + T)` by `BlockStack.forward` (gpt-fast style). Keys are stored after rotary embedding,
so a cache is valid only for the positions it was written with. Allocated zeroed so that reading an
unwritten slot can never inject NaN. Conversion to any other layout happens only at the HF boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerCache:
    """One block's preallocated KV cache for one session."""

    k: torch.Tensor  # [batch, num_kv_heads, max_length, head_dim]
    v: torch.Tensor

    @classmethod
    def zeros(cls, shape: tuple[int, ...], *, dtype: torch.dtype, device="cpu") -> LayerCache:
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_length(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
