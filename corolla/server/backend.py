"""The block backend: the hosted :class:`BlockStack` behind the compute worker, with input checks.

Everything that reaches the blocks comes through here, already decoded; this layer checks that the
tensors fit the hosted model (shape, dtype family, block range, lengths) and raises
:class:`BadRequestError` / :class:`SessionLengthError` naming what is wrong before any computation.
"""

from __future__ import annotations

import torch

from corolla.models.session import KVSession
from corolla.models.stack import BlockStack
from corolla.server.checks import check_hypo_ids, check_inputs, check_prompts, check_range
from corolla.server.compute import PRIORITY_FORWARD, PRIORITY_INFERENCE, ComputeWorker
from corolla.wire.errors import BadRequestError, SessionLengthError


class BlockBackend:
    def __init__(self, stack: BlockStack, worker: ComputeWorker):
        self.stack = stack.requires_grad_(False)  # clients train their own tensors, never these weights
        self.worker = worker
        self.dtype = next(stack.parameters()).dtype
        self.device = next(stack.parameters()).device
        self.hidden_size = stack.config.hidden_size

    def check_range(self, start: int, end: int) -> None:
        check_range(self.stack, start, end)

    async def forward(
        self, start: int, end: int, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ):
        self.check_range(start, end)
        check_inputs(self.hidden_size, hidden, positions, mask, None)
        return await self.worker.submit(PRIORITY_FORWARD, self._forward, start, end, hidden, positions, mask)

    def _forward(self, start, end, hidden, positions, mask):
        hidden = hidden.to(self.device, self.dtype)
        out = self.stack(hidden, positions.to(self.device), mask.to(self.device), None, 0, (start, end))
        return out.cpu()

    def open_session(self, start: int, end: int, batch_size: int, max_length: int) -> KVSession:
        """Caches for one session (the same session code as the client's in-process chain)."""
        self.check_range(start, end)
        return KVSession(self.stack, start, end, batch_size, max_length)

    async def inference_step(
        self,
        session: KVSession,
        offset: int,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        prompts: torch.Tensor | None = None,
        hypo_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One step; ``prompts`` (deep prompts of the session's blocks) apply to cache positions < K;
        ``hypo_ids`` (beam search) reorders the cache's rows first."""
        check_inputs(self.hidden_size, hidden, positions, mask, session.batch_size)
        check_prompts(prompts, session.end - session.start, hidden)
        check_hypo_ids(hypo_ids, session.batch_size)
        tokens = hidden.shape[1]
        if not 0 <= offset <= session.length:
            raise BadRequestError(f"step offset {offset} is past the session's {session.length} cached tokens")
        if offset + tokens > session.max_length:
            raise SessionLengthError(
                f"step would fill cache positions up to {offset + tokens}, over the session's max_length "
                f"{session.max_length}"
            )
        if hypo_ids is not None:
            await self.worker.submit(PRIORITY_INFERENCE, session.reorder, hypo_ids)
        if prompts is None:  # batched with other sessions' steps (see corolla.server.compute)
            return await self.worker.submit_step(session, offset, hidden, positions, mask)
        return await self.worker.submit(
            PRIORITY_INFERENCE, self._step, session, offset, hidden, positions, mask, prompts
        )

    def _step(self, session: KVSession, offset, hidden, positions, mask, prompts) -> torch.Tensor:
        """On the compute thread: one step of ``session`` (bench.common's probe times this)."""
        return session.step(offset, hidden, positions, mask, prompts).cpu()
