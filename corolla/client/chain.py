"""What the client's model classes need from the swarm, as two small interfaces.

The HF-compatible model classes (:mod:`corolla.client.model`) only embed tokens, call a
:class:`RemoteChain` on hidden states and apply the LM head. The chain is either the real swarm
(:class:`corolla.client.sequence_manager.RemoteSequenceManager`) or, in unit tests, an in-process fake
built on a local :class:`BlockStack` (:mod:`corolla.client.local_chain`); both follow these protocols.

Tensors are on the CPU. ``positions`` [B, T] int64 are the tokens' position ids; ``attention_mask``
[B, T] bool marks real tokens (False = padding), for the T new tokens only.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ChainSession(Protocol):
    """Server-side KV caches over every block, for one sequence batch. Opened lazily on the first step."""

    max_length: int

    @property
    def position(self) -> int:
        """How many tokens the caches hold (the offset of the next step)."""

    def step(self, hidden: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the T new tokens through all blocks at ``position``; returns [B, T, H]."""

    def close(self) -> None: ...


class RemoteChain(Protocol):
    num_blocks: int

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor,
                start: int = 0, end: int | None = None) -> torch.Tensor:  # fmt: skip
        """Blocks [start, end) over whole sequences, no cache; returns [B, T, H]."""

    def open_session(self, max_length: int) -> ChainSession: ...
