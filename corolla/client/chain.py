"""The one interface between the HF-compatible model classes and whatever runs the blocks.

The model classes (:mod:`corolla.client.model`) only embed tokens, call a :class:`RemoteChain` on
hidden states and apply the LM head. Two chains implement it fully, and nothing in corolla asks which
one it has:

- the swarm, :class:`corolla.client.sequence_manager.RemoteSequenceManager` (routing, failover, the
  wire), and
- the in-process chain over a local ``BlockStack``, :class:`corolla.client.local_chain.LocalChain`
  (unit tests, ``bench/`` references), which runs the server's own session code
  (:class:`corolla.models.session.KVSession`).

A chain runs blocks [start, end) over whole sequences (``forward``, differentiable with respect to the
hidden states, deep prompts and the parameters of its :class:`ChainExtras`), opens inference sessions
that keep KV caches (``open_session``), describes its route, and shuts down. Decorators such as
:class:`corolla.client.lora.LoraChain` are chains too.

Tensors are on the CPU. ``positions`` [B, T] int64 are the tokens' position ids; ``attention_mask``
[B, T] bool marks real tokens (False = padding), for the T new tokens only. ``prompts`` are deep prompts
``[end - start, B or 1, K, H]`` added before each block to the first K positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class RouteHop:
    """One server of a session's chain, for people: its peer id, its name, the blocks it runs."""

    peer_id: str
    name: str
    start: int
    end: int


class ChainSession(ABC):
    """KV caches over every block for one batch of sequences. Opened lazily on the first step."""

    max_length: int
    #: How many times a failed server was replaced during this session.
    failovers: int = 0

    @property
    @abstractmethod
    def position(self) -> int:
        """How many tokens the caches hold (the offset of the next step)."""

    @abstractmethod
    def step(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor,
        hypo_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the T new tokens through all blocks at ``position``; returns [B, T, H]. ``hypo_ids`` [B]
        (beam search): first, cached row ``i`` becomes row ``hypo_ids[i]``."""

    @abstractmethod
    def rewind(self, position: int) -> None:
        """Forget the tokens from ``position`` on (``0 <= position <= self.position``); the next step goes there.

        Nothing is sent: the next step overwrites the caches from ``position`` (speculative decoding keeps
        only the accepted tokens this way, and a failover replays only those)."""

    def describe_route(self) -> list[RouteHop]:
        """The servers the session uses now (empty for an in-process chain)."""
        return []

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> ChainSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChainExtras:
    """Per-block trainable tensors beyond deep prompts that ride with a chain's calls: a client's own LoRA.

    The base class adds nothing. A subclass names the ``adapter`` its requests carry, lists the tensors
    of blocks [start, end) that gradients flow to (``parameters``), and says how to use them on each
    kind of chain: on the swarm it prepares a server before a request (``before_call``: an upload),
    recovers from failures that are not the server's fault (``recover``), and turns a backward
    response's extra gradients into the parameters' gradients (``span_grads`` then ``param_grads``); in
    process, ``local_context`` makes a stack apply them under ordinary autograd.
    """

    adapter: str = ""

    def parameters(self, start: int, end: int) -> Sequence[torch.Tensor]:
        return ()

    async def before_call(self, manager: Any, peer: str, start: int, end: int) -> None:
        pass

    def recover(self, peer: str, error: BaseException) -> bool:
        """True when ``error`` is handled here (retry the server without banning it)."""
        return False

    def span_grads(self, response: Any, request: Any) -> dict:
        """The extra gradients in one backward response, checked, keyed as ``param_grads`` expects."""
        return {}

    def param_grads(self, grads: dict, start: int, end: int) -> Sequence[torch.Tensor]:
        """Gradients of ``parameters(start, end)``, in order, from the grads summed over a call's spans."""
        return ()

    def local_context(self, stack: Any, start: int, end: int) -> AbstractContextManager:
        """While active, ``stack``'s blocks [start, end) (absolute indices) apply these tensors."""
        return nullcontext()

    def release(self) -> None:
        """Drop whatever servers hold for this client (best effort)."""


NO_EXTRAS = ChainExtras()


class RemoteChain(ABC):
    """Blocks [0, num_blocks) of one model, wherever they run."""

    num_blocks: int

    @abstractmethod
    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor,
        start: int = 0,
        end: int | None = None,
        *,
        prompts: torch.Tensor | None = None,
        extras: ChainExtras = NO_EXTRAS,
    ) -> torch.Tensor:
        """Blocks [start, end) over whole sequences, no cache; returns [B, T, H].

        Differentiable with respect to ``hidden``, ``prompts`` and ``extras.parameters``."""

    @abstractmethod
    def open_session(
        self,
        max_length: int,
        *,
        adapter: str | None = None,
        prompts: torch.Tensor | None = None,
        extras: ChainExtras = NO_EXTRAS,
        blocks: tuple[int, int] | None = None,
    ) -> ChainSession:
        """A session over every block for up to ``max_length`` tokens.

        ``adapter``: a served LoRA adapter (None: the chain's default); ``prompts``: deep prompts
        ``[num_blocks, 1, K, H]`` for cache positions < K; ``extras``: the client's own trainables.``blocks``: a session over blocks
        [start, end) only (default: every block; deep prompts need every block).
        """

    @abstractmethod
    def show_route(self) -> str:
        """The chain a new inference session would use now, as text."""

    @abstractmethod
    def shutdown(self) -> None:
        """Leave the swarm (an in-process chain has nothing to do)."""
