"""An in-process :class:`RemoteChain` over a local :class:`BlockStack`: the fake used by unit tests
and by ``bench/`` as a no-network reference. It has the same semantics as the swarm, minus the swarm.
"""

from __future__ import annotations

import torch

from corolla.models.stack import BlockStack


class LocalChainSession:
    def __init__(self, stack: BlockStack, max_length: int):
        self.stack, self.max_length = stack, max_length
        self._caches = None
        self._valid: torch.Tensor | None = None
        self._position = 0

    @property
    def position(self) -> int:
        return self._position

    def step(self, hidden: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, tokens = hidden.shape[:2]
        if self._caches is None:
            self._caches = self.stack.allocate_cache(batch, self.max_length)
            self._valid = torch.zeros(batch, self.max_length, dtype=torch.bool)
        end = self._position + tokens
        if end > self.max_length:
            raise ValueError(f"session max_length {self.max_length} exceeded ({end} tokens)")
        self._valid[:, self._position : end] = attention_mask
        with torch.inference_mode():
            out = self._run(hidden, positions, self._valid[:, :end])
        self._position = end
        return out

    def _run(self, hidden: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The blocks over this step's tokens at the session's position (subclasses add per-block inputs)."""
        return self.stack(hidden, positions, valid, self._caches, self._position)

    def close(self) -> None:
        self._caches = None


class LocalChain:
    def __init__(self, stack: BlockStack):
        self.stack = stack
        self.num_blocks = stack.end - stack.start

    def forward(self, hidden, positions, attention_mask, start: int = 0, end: int | None = None) -> torch.Tensor:
        end = self.num_blocks if end is None else end
        return self.stack(hidden, positions, attention_mask, None, 0, (start, end))

    def open_session(self, max_length: int) -> LocalChainSession:
        return LocalChainSession(self.stack, max_length)
