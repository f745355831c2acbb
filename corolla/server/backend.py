"""The block backend: the hosted :class:`BlockStack` behind the compute worker, with input checks.

Everything that reaches the blocks comes through here, already decoded; this layer checks that the
tensors fit the hosted model (shape, dtype family, block range, lengths) and raises
:class:`BadRequestError` / :class:`SessionLengthError` naming what is wrong before any computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from corolla.models.cache import LayerCache
from corolla.models.deep_prompts import run_blocks
from corolla.models.stack import BlockStack
from corolla.server.backward import check_prompts
from corolla.server.compute import PRIORITY_FORWARD, PRIORITY_INFERENCE, ComputeWorker
from corolla.wire.errors import BadRequestError, SessionLengthError


@dataclass
class SessionState:
    """One inference session's cache over blocks [start, end) and how much of it is filled."""

    start: int
    end: int
    batch_size: int
    max_length: int
    caches: list[LayerCache]
    valid: torch.Tensor  # [batch, max_length] bool: which cached positions hold real tokens
    length: int = 0


class BlockBackend:
    def __init__(self, stack: BlockStack, worker: ComputeWorker):
        self.stack = stack.requires_grad_(False)  # clients train their own tensors, never these weights
        self.worker = worker
        self.dtype = next(stack.parameters()).dtype
        self.device = next(stack.parameters()).device
        self.hidden_size = stack.config.hidden_size

    def check_range(self, start: int, end: int) -> None:
        if not self.stack.start <= start < end <= self.stack.end:
            raise BadRequestError(
                f"blocks [{start}, {end}) are not within this server's blocks [{self.stack.start}, {self.stack.end})"
            )

    def check_inputs(
        self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, batch: int | None
    ) -> None:
        if hidden.ndim != 3 or hidden.shape[-1] != self.hidden_size or hidden.shape[1] == 0:
            raise BadRequestError(
                f"hidden states must be [batch, tokens >= 1, {self.hidden_size}], got {list(hidden.shape)}"
            )
        if not hidden.is_floating_point():
            raise BadRequestError(f"hidden states must be floating point, got {hidden.dtype}")
        if batch is not None and hidden.shape[0] != batch:
            raise BadRequestError(
                f"the session was opened with batch size {batch}, this step has {hidden.shape[0]}"
            )
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

    async def forward(
        self, start: int, end: int, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ):
        self.check_range(start, end)
        self.check_inputs(hidden, positions, mask, None)
        return await self.worker.submit(PRIORITY_FORWARD, self._forward, start, end, hidden, positions, mask)

    def _forward(self, start, end, hidden, positions, mask):
        hidden = hidden.to(self.device, self.dtype)
        out = self.stack(hidden, positions.to(self.device), mask.to(self.device), None, 0, (start, end))
        return out.cpu()

    def open_session(self, start: int, end: int, batch_size: int, max_length: int) -> SessionState:
        caches = self.stack.allocate_cache(batch_size, max_length, blocks=(start, end))
        valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=self.device)
        return SessionState(start, end, batch_size, max_length, caches, valid)

    async def inference_step(
        self,
        session: SessionState,
        offset: int,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One step; ``prompts`` (deep prompts of the session's blocks) apply to cache positions < K."""
        self.check_inputs(hidden, positions, mask, session.batch_size)
        check_prompts(prompts, session.end - session.start, hidden)
        tokens = hidden.shape[1]
        if not 0 <= offset <= session.length:
            raise BadRequestError(f"step offset {offset} is past the session's {session.length} cached tokens")
        if offset + tokens > session.max_length:
            raise SessionLengthError(
                f"step would fill cache positions up to {offset + tokens}, over the session's max_length "
                f"{session.max_length}"
            )
        out = await self.worker.submit(
            PRIORITY_INFERENCE, self._step, session, offset, hidden, positions, mask, prompts
        )
        session.length = offset + tokens
        return out

    def _step(self, session: SessionState, offset, hidden, positions, mask, prompts=None):
        end = offset + hidden.shape[1]
        session.valid[:, offset:end] = mask.to(self.device)
        hidden = hidden.to(self.device, self.dtype)
        out = run_blocks(
            self.stack,
            (session.start, session.end),
            hidden,
            positions.to(self.device),
            session.valid[:, :end],
            None if prompts is None else prompts.to(self.device, self.dtype),
            session.caches,
            offset,
        )
        return out.cpu()
