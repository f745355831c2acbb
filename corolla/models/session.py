"""One inference session's KV caches over a span of a :class:`BlockStack`: the code servers and the client's
in-process chain share.

A session preallocates its caches (``BlockStack.allocate_cache``: one layout, written at each step's
offset) and a ``valid`` mask of which cached positions hold real tokens (False = left padding). A step at
``offset`` writes its tokens' mask there, runs the blocks over them against ``valid[:, :offset + T]``
(deep prompts, when given, are added to positions < K), and leaves ``length = offset + T``: a step below
the current length overwrites, so retries and replays are exact. Callers validate messages; this class
checks only what would corrupt its own state, with ``ValueError``.
"""

from __future__ import annotations

import torch

from corolla.models.deep_prompts import run_blocks
from corolla.models.stack import BlockStack


class KVSession:
    """KV caches of one session over blocks [start, end) of a BlockStack, and how much of them is filled."""

    def __init__(self, stack: BlockStack, start: int, end: int, batch_size: int, max_length: int):
        if not stack.start <= start < end <= stack.end:
            raise ValueError(f"blocks [{start}, {end}) are not within the stack's [{stack.start}, {stack.end})")
        self.stack, self.start, self.end = stack, start, end
        self.batch_size, self.max_length = batch_size, max_length
        self.caches = stack.allocate_cache(batch_size, max_length, blocks=(start, end))
        device = next(stack.parameters()).device
        self.valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.length = 0

    def rewind(self, length: int) -> None:
        """Keep only the first ``length`` cached tokens (the next step writes at ``length``)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a session holding {self.length} tokens to {length}")
        self.length = length

    def step(
        self,
        offset: int,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The T new tokens through the blocks at cache ``offset``; returns [B, T, H] in the stack's dtype."""
        end = offset + hidden.shape[1]
        if not 0 <= offset <= self.length or end > self.max_length:
            raise ValueError(
                f"a step of {hidden.shape[1]} tokens at offset {offset} does not fit a session holding "
                f"{self.length} of {self.max_length} tokens"
            )
        parameter = next(self.stack.parameters())
        device, dtype = parameter.device, parameter.dtype
        self.valid[:, offset:end] = mask.to(device)
        out = run_blocks(
            self.stack,
            (self.start, self.end),
            hidden.to(device, dtype),
            positions.to(device),
            self.valid[:, :end],
            None if prompts is None else prompts.to(device, dtype),
            self.caches,
            offset,
        )
        self.length = end
        return out
