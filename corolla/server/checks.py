"""Checks of decoded request tensors against the hosted blocks, before any compute or allocation.

Each raises :class:`BadRequestError` naming what is wrong (shape, dtype, range), so the server answers
with that error and keeps serving everyone else. Shared by inference (:mod:`corolla.server.backend`) and
training (:mod:`corolla.server.backward`).
"""

from __future__ import annotations

import torch

from corolla.models.stack import BlockStack
from corolla.wire.errors import BadRequestError


def check_range(stack: BlockStack, start: int, end: int) -> None:
    """Blocks [start, end) must be a non-empty part of the hosted ones."""
    if not stack.start <= start < end <= stack.end:
        raise BadRequestError(
            f"blocks [{start}, {end}) are not within this server's blocks [{stack.start}, {stack.end})"
        )


def check_inputs(
    hidden_size: int, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, batch: int | None
) -> None:
    """Hidden states ``[B, T >= 1, H]`` (floating point), int64 positions and a bool mask of ``[B, T]``;
    ``batch``, when given, is the session's batch size."""
    if hidden.ndim != 3 or hidden.shape[-1] != hidden_size or hidden.shape[1] == 0:
        raise BadRequestError(
            f"hidden states must be [batch, tokens >= 1, {hidden_size}], got {list(hidden.shape)}"
        )
    if not hidden.is_floating_point():
        raise BadRequestError(f"hidden states must be floating point, got {hidden.dtype}")
    if batch is not None and hidden.shape[0] != batch:
        raise BadRequestError(f"the session was opened with batch size {batch}, this step has {hidden.shape[0]}")
    if positions.shape != hidden.shape[:2] or positions.dtype != torch.int64:
        raise BadRequestError(
            f"positions must be int64 {list(hidden.shape[:2])}, got {positions.dtype} {list(positions.shape)}"
        )
    if mask.shape != hidden.shape[:2] or mask.dtype != torch.bool:
        raise BadRequestError(
            f"attention_mask must be bool {list(hidden.shape[:2])}, got {mask.dtype} {list(mask.shape)}"
        )
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= 1 << 24):
        raise BadRequestError("positions must be in [0, 2**24)")


def check_hypo_ids(hypo_ids: torch.Tensor | None, batch: int) -> None:
    """Beam reordering: int64 ``[batch]`` row indices in ``[0, batch)``."""
    if hypo_ids is None:
        return
    if hypo_ids.dtype != torch.int64 or tuple(hypo_ids.shape) != (batch,):
        raise BadRequestError(f"hypo_ids must be int64 [{batch}], got {hypo_ids.dtype} {list(hypo_ids.shape)}")
    if int(hypo_ids.min()) < 0 or int(hypo_ids.max()) >= batch:
        raise BadRequestError(f"hypo_ids must be row indices in [0, {batch})")


def check_prompts(prompts: torch.Tensor | None, num_blocks: int, hidden: torch.Tensor, what: str = "prompts"):
    """Deep prompts must be floating ``[num_blocks, B or 1, K, H]`` with ``1 <= K``."""
    if prompts is None:
        return
    batch, _, hidden_size = hidden.shape
    shape = list(prompts.shape)
    if (
        prompts.ndim != 4
        or shape[0] != num_blocks
        or shape[1] not in (1, batch)
        or shape[2] < 1
        or shape[3] != hidden_size
        or not prompts.is_floating_point()
    ):
        raise BadRequestError(
            f"{what} must be floating point [{num_blocks} blocks, {batch} or 1, prompt tokens >= 1, "
            f"{hidden_size}], got {prompts.dtype} {shape}"
        )
