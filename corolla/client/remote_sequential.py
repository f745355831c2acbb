"""`RemoteSequential`: the model's transformer blocks as one `nn.Module` that calls a `RemoteChain`.

It is what `model.model.layers` is, so Petals-style code that runs hidden states through the blocks
(`model.model.layers(hidden)`, `len(layers)`, `layers[4:8]`, `layers.inference_session(...)`) works.

Decisions:

- The chain is stored outside the module tree (`__dict__`, not a registered submodule), so the
  client's `parameters()`/`state_dict()` never include blocks, even if a chain implementation happens to
  be an `nn.Module` holding weights (the in-process `LocalChain`'s stack, for instance).
- Tensors cross to the chain on the CPU (the protocol of `corolla.client.chain`) and come back on the
  caller's device, so `model.cuda()` keeps working with a CPU-only chain.
- Defaults match `LlamaModel.forward` without a cache: every token valid, positions 0..T-1.
- Slicing gives a view over a sub-range of blocks that calls `chain.forward(start=, end=)`; sessions
  always cover every block, so only the full range opens one.
- **Autograd.** `forward` is the chain's `forward`, differentiable: on the swarm, when gradients are
  needed, `loss.backward()` sends the gradients back through the servers; deep prompts (`prompts`
  [blocks, B or 1, K, H]) travel with the hidden states.
"""

from __future__ import annotations

import torch
from torch import nn

from corolla.client.chain import ChainSession, RemoteChain

__all__ = ["RemoteSequential"]


class RemoteSequential(nn.Module):
    """Blocks [start, end) of a remote chain, callable on hidden states [B, T, H]."""

    def __init__(self, chain: RemoteChain, start: int = 0, end: int | None = None):
        super().__init__()
        end = chain.num_blocks if end is None else end
        if not 0 <= start < end <= chain.num_blocks:
            raise ValueError(f"block range [{start}, {end}) is not within [0, {chain.num_blocks})")
        self.__dict__["chain"] = chain  # not a submodule: see the module docstring
        self.start, self.end = start, end

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run whole sequences through the blocks, without a cache; returns [B, T, H].

        ``prompts`` [len(self), B or 1, K, H]: deep prompts added before each block to the first K tokens.
        """
        batch, length = hidden_states.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.bool)
        if position_ids is None:
            position_ids = torch.arange(length).unsqueeze(0)
        positions = position_ids.to("cpu", torch.long).expand(batch, length)
        out = self.chain.forward(
            hidden_states.cpu(), positions, attention_mask.cpu().bool(), self.start, self.end,
            prompts=None if prompts is None else prompts.cpu(),
        )  # fmt: skip
        return out.to(hidden_states.device)

    def inference_session(self, max_length: int, **options) -> ChainSession:
        """A raw chain session over every block (`.step(hidden, positions, mask)`, `.position`, `.close()`);
        ``options`` are :meth:`RemoteChain.open_session`'s (adapter, prompts, extras)."""
        if (self.start, self.end) != (0, self.chain.num_blocks):
            raise ValueError("an inference session covers every block; open it on the unsliced layers")
        return self.chain.open_session(max_length, **options)

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, index: int | slice) -> RemoteSequential:
        if isinstance(index, int):
            if index < 0:
                index += len(self)
            if not 0 <= index < len(self):
                raise IndexError(f"block {index} out of range for {len(self)} blocks")
            return RemoteSequential(self.chain, self.start + index, self.start + index + 1)
        first, last, step = index.indices(len(self))
        if step != 1:
            raise ValueError("remote blocks can only be sliced contiguously")
        return RemoteSequential(self.chain, self.start + first, self.start + last)

    def extra_repr(self) -> str:
        return f"blocks [{self.start}, {self.end}) on {type(self.chain).__name__}"
