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

from typing import NamedTuple

import torch

from corolla.models.deep_prompts import run_blocks
from corolla.models.stack import BlockStack, Segment


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
        self.closed = False

    def close(self) -> None:
        """Free the caches now (whoever still holds this object, e.g. a traceback, holds no memory)."""
        self.closed = True
        self.caches = []
        self.valid = self.valid[:, :0]

    def rewind(self, length: int) -> None:
        """Keep only the first ``length`` cached tokens (the next step writes at ``length``)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a session holding {self.length} tokens to {length}")
        self.length = length

    def reorder(self, hypo_ids: torch.Tensor) -> None:
        """Row ``i`` of the caches becomes row ``hypo_ids[i]`` (beam search keeps the best hypotheses; a row may
        be copied into several). ``hypo_ids`` [B] int64 in [0, B)."""
        if tuple(hypo_ids.shape) != (self.batch_size,) or hypo_ids.dtype != torch.int64:
            raise ValueError(
                f"hypo_ids must be int64 [{self.batch_size}], got {hypo_ids.dtype} {list(hypo_ids.shape)}"
            )
        if int(hypo_ids.min()) < 0 or int(hypo_ids.max()) >= self.batch_size:
            raise ValueError(f"hypo_ids must be row indices in [0, {self.batch_size}), got {hypo_ids.tolist()}")
        index = hypo_ids.to(self.valid.device)
        length = self.length
        for cache in self.caches:
            cache.k[:, :, :length] = cache.k[index, :, :length]
            cache.v[:, :, :length] = cache.v[index, :, :length]
        self.valid[:, :length] = self.valid[index, :length]

    def step(
        self,
        offset: int,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The T new tokens through the blocks at cache ``offset``; returns [B, T, H] in the stack's dtype."""
        segment = self._segment(offset, hidden, positions, mask)
        out = run_blocks(
            self.stack,
            (self.start, self.end),
            segment.hidden,
            segment.positions,
            segment.attention_mask,
            None if prompts is None else prompts.to(segment.hidden.device, segment.hidden.dtype),
            self.caches,
            offset,
        )
        self.length = offset + hidden.shape[1]
        return out

    def _segment(self, offset: int, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> Segment:
        """Check that a step fits, record its tokens' mask, and return it as the stack's forward takes it."""
        end = offset + hidden.shape[1]
        if self.closed:
            raise ValueError("this session is closed")
        if not 0 <= offset <= self.length or end > self.max_length:
            raise ValueError(
                f"a step of {hidden.shape[1]} tokens at offset {offset} does not fit a session holding "
                f"{self.length} of {self.max_length} tokens"
            )
        parameter = next(self.stack.parameters())
        device, dtype = parameter.device, parameter.dtype
        self.valid[:, offset:end] = mask.to(device)
        return Segment(hidden.to(device, dtype), positions.to(device), self.valid[:, :end], self.caches, offset)


class SessionStep(NamedTuple):
    """One step of one session, as :func:`step_sessions` takes it (:meth:`KVSession.step`'s arguments)."""

    session: KVSession
    offset: int
    hidden: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor


def step_sessions(steps: list[SessionStep]) -> list[torch.Tensor]:
    """Steps of several sessions over the same blocks of one stack, as one forward (the projections and
    MLPs run once over all their rows; see ``BlockStack.forward_segments``). Each output equals that
    session's own :meth:`KVSession.step` up to matmul rounding. No deep prompts here: such steps run alone."""
    first = steps[0].session
    for step in steps:
        session = step.session
        if (session.stack, session.start, session.end) != (first.stack, first.start, first.end):
            raise ValueError("sessions of one batch must run the same blocks of the same stack")
    if len({id(step.session) for step in steps}) != len(steps):
        raise ValueError("a batch holds at most one step per session")
    segments = [step.session._segment(step.offset, step.hidden, step.positions, step.mask) for step in steps]
    outs = first.stack.forward_segments(segments, (first.start, first.end))
    for step in steps:
        step.session.length = step.offset + step.hidden.shape[1]
    return outs
