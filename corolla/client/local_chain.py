"""An in-process :class:`~corolla.client.chain.RemoteChain` over a local :class:`BlockStack`.

Used by unit tests and by ``bench/`` as a no-network reference. It has the swarm's semantics minus the
swarm: sessions run the server's own session code (:class:`corolla.models.session.KVSession`, the cache
layout and step a server's backend uses), forward runs :func:`corolla.models.deep_prompts.run_blocks`
under ordinary autograd, and a client's trainables (:class:`~corolla.client.chain.ChainExtras`) apply
through their ``local_context``.
"""

from __future__ import annotations

import torch

from corolla.client.chain import NO_EXTRAS, ChainExtras, ChainSession, RemoteChain
from corolla.models.deep_prompts import run_blocks
from corolla.models.session import KVSession
from corolla.models.stack import BlockStack


class LocalChainSession(ChainSession):
    def __init__(
        self,
        stack: BlockStack,
        max_length: int,
        prompts: torch.Tensor | None = None,
        extras: ChainExtras = NO_EXTRAS,
        blocks: tuple[int, int] | None = None,
    ):
        self.stack, self.max_length = stack, max_length
        self.prompts, self.extras = prompts, extras
        self.blocks = blocks if blocks is not None else (stack.start, stack.end)  # absolute indices
        self._session: KVSession | None = None

    @property
    def position(self) -> int:
        return 0 if self._session is None else self._session.length

    def step(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor,
        hypo_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        stack = self.stack
        if self._session is None:
            self._session = KVSession(stack, *self.blocks, hidden.shape[0], self.max_length)
        end = self.position + hidden.shape[1]
        if end > self.max_length:
            raise ValueError(f"session max_length {self.max_length} exceeded ({end} tokens)")
        with torch.inference_mode(), self.extras.local_context(stack, *self.blocks):
            if hypo_ids is not None and self._session.length:
                self._session.reorder(hypo_ids.to(torch.int64))
            return self._session.step(self.position, hidden, positions, attention_mask.bool(), self.prompts)

    def rewind(self, position: int) -> None:
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind a session holding {self.position} tokens to {position}")
        if self._session is not None:
            self._session.rewind(position)

    def close(self) -> None:
        self._session = None


class LocalChain(RemoteChain):
    def __init__(self, stack: BlockStack):
        self.stack = stack
        self.num_blocks = stack.end - stack.start

    def forward(
        self, hidden, positions, attention_mask, start: int = 0, end: int | None = None, *,
        prompts: torch.Tensor | None = None, extras: ChainExtras = NO_EXTRAS,
    ) -> torch.Tensor:  # fmt: skip
        end = self.num_blocks if end is None else end
        if prompts is not None and prompts.shape[0] != end - start:
            raise ValueError(f"got deep prompts for {prompts.shape[0]} blocks, running {end - start}")
        blocks = (self.stack.start + start, self.stack.start + end)
        with extras.local_context(self.stack, *blocks):
            return run_blocks(self.stack, blocks, hidden, positions, attention_mask, prompts)

    def open_session(
        self, max_length: int, *, adapter: str | None = None, prompts: torch.Tensor | None = None,
        extras: ChainExtras = NO_EXTRAS, blocks: tuple[int, int] | None = None,
    ) -> LocalChainSession:  # fmt: skip
        if adapter:
            raise ValueError(f"an in-process chain serves no adapters (asked for {adapter!r})")
        start, end = blocks if blocks is not None else (0, self.num_blocks)
        if not 0 <= start < end <= self.num_blocks:
            raise ValueError(f"blocks [{start}, {end}) are not within [0, {self.num_blocks})")
        if prompts is not None and (start, end) != (0, self.num_blocks):
            raise ValueError("deep prompts need a session over every block")
        base = self.stack.start
        return LocalChainSession(self.stack, max_length, prompts, extras, (base + start, base + end))

    def show_route(self) -> str:
        return f"blocks [{self.stack.start}, {self.stack.end}) in process"

    def shutdown(self) -> None:
        pass
