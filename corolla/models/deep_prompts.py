"""Blocks with deep prompts: per-block trainable vectors added to the first positions of the sequence.

Deep prompt tuning (Petals' ``deep_ptune``) keeps ``K`` virtual tokens at the front of every sequence and,
before each block ``i``, adds that block's prompt to their hidden states: ``hidden[:, :K] += prompts[i]``.
Both the servers (training forward/backward, inference steps over the prefix) and the client's local
references run blocks through :func:`run_blocks`, so the two compute the same thing.

``prompts`` is ``[num_blocks, B or 1, K, H]`` for the blocks ``[a, b)`` run; a batch of 1 is shared by
every row. Prompts belong to cache positions ``[0, K)``: a cached step at ``offset`` with ``T`` tokens
gets the part of the prompts that falls in ``[offset, offset + T)``, so a prefix sent in chunks (a
replay after a failover) is prompted exactly as a prefix sent at once. Without prompts (or past the
prefix) this is one ``BlockStack`` call; with them, one call per block, out of place, so autograd
gives the gradients of the prompts too.
"""

from __future__ import annotations

import torch

from corolla.models.cache import LayerCache
from corolla.models.stack import BlockStack


def prompt_overlap(num_prompts: int, offset: int, tokens: int) -> int:
    """How many of the ``tokens`` tokens starting at cache ``offset`` are prompt positions (< num_prompts)."""
    return max(0, min(num_prompts, offset + tokens) - offset)


def run_blocks(
    stack: BlockStack,
    blocks: tuple[int, int],
    hidden: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor,
    prompts: torch.Tensor | None = None,
    caches: list[LayerCache] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Blocks ``[a, b)`` of ``stack`` over ``hidden``, adding deep ``prompts`` before each block (see above)."""
    first, last = blocks
    count = 0 if prompts is None else prompt_overlap(prompts.shape[2], offset, hidden.shape[1])
    if count == 0:
        return stack(hidden, positions, attention_mask, caches, offset, blocks)
    if prompts.shape[0] != last - first:
        raise ValueError(f"got prompts for {prompts.shape[0]} blocks, running {last - first}")
    for i, block in enumerate(range(first, last)):
        prompt = prompts[i, :, offset : offset + count].to(hidden.dtype)
        hidden = torch.cat([hidden[:, :count] + prompt, hidden[:, count:]], dim=1)
        cache = None if caches is None else caches[i : i + 1]
        hidden = stack(hidden, positions, attention_mask, cache, offset, (block, block + 1))
    return hidden
