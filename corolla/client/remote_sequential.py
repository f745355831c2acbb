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

__all__ = ["BlocksSession", "RemoteSequential"]


class BlocksSession(ChainSession):
    """A chain session stepped with hidden states directly, the way Petals' raw sessions are.

    ``step(hidden_states)`` takes positions and mask as optional (default: the next positions, every token
    real), accepts an empty step ([B, 0, H] gives [B, 0, H] back without a call), and Petals'
    ``start_from_position=n`` (rewind to n first); ``position`` is settable (rewinds); ``hypo_ids`` [B]
    reorders the cached rows before the step (beam search: every server reorders its own cache). Petals'
    per-step ``prompts`` are refused by name: deep prompts are given when the session opens.
    """

    def __init__(self, session: ChainSession):
        self.session, self.max_length = session, session.max_length

    @property
    def position(self) -> int:
        return self.session.position

    @position.setter
    def position(self, value: int) -> None:
        self.rewind(value)

    @property
    def failovers(self) -> int:
        return self.session.failovers

    def rewind(self, position: int) -> None:
        self.session.rewind(position)

    def step(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        prompts: torch.Tensor | None = None,
        hypo_ids: torch.Tensor | None = None,
        start_from_position: int | None = None,
    ) -> torch.Tensor:
        if prompts is not None:
            raise ValueError("per-step prompts are not supported: pass prompts= when opening the session")
        if start_from_position is not None:
            self.rewind(start_from_position)
        if hidden_states.shape[1] == 0:
            return hidden_states
        positions, mask = _chain_inputs(hidden_states, positions, attention_mask, first=self.position)
        hypo_ids = None if hypo_ids is None else hypo_ids.cpu().long()
        return self.session.step(hidden_states.cpu(), positions, mask, hypo_ids=hypo_ids).to(hidden_states.device)

    def describe_route(self):
        return self.session.describe_route()

    def __getattr__(self, name: str):
        """What else the session offers (the swarm's `route`, `adapter`, ...), read through."""
        if name == "session":  # not set yet (during unpickling or a failed __init__)
            raise AttributeError(name)
        return getattr(self.session, name)

    def close(self) -> None:
        self.session.close()


class RemoteSequential(nn.Module):
    """Blocks [start, end) of a remote chain, callable on hidden states [B, T, H]."""

    def __init__(
        self,
        chain,
        start: int = 0,
        end: int | None = None,
        *,
        dht=None,
        start_block: int | None = None,
        end_block: int | None = None,
        sequence_manager: RemoteChain | None = None,
    ):
        """``RemoteSequential(chain, start, end)``, or Petals' ``RemoteSequential(config, dht=None,
        start_block=None, end_block=None, sequence_manager=None)`` with a config from `AutoDistributedConfig`:
        it joins the swarm through the config's initial peers (or, given a hivemind ``DHT``, through that peer's
        addresses), or uses ``sequence_manager`` (a `RemoteSequenceManager` of the same model)."""
        super().__init__()
        if sequence_manager is not None:
            if dht is not None:
                raise ValueError("pass either dht= or sequence_manager=, not both")
            _check_manager_fits(chain, sequence_manager)
            chain = sequence_manager
        elif not isinstance(chain, RemoteChain):
            chain = _chain_from_config(chain, dht)
        elif dht is not None:
            raise ValueError("dht= is for building a RemoteSequential from a config, not from a chain")
        start = start_block if start_block is not None else start
        end = end_block if end_block is not None else end
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
        positions, mask = _chain_inputs(hidden_states, position_ids, attention_mask, first=0)
        out = self.chain.forward(
            hidden_states.cpu(), positions, mask, self.start, self.end,
            prompts=None if prompts is None else prompts.cpu(),
        )  # fmt: skip
        return out.to(hidden_states.device)

    @property
    def sequence_manager(self) -> RemoteChain:
        """Petals' name for the chain these blocks run on (the whole model's, also for a slice)."""
        return self.chain

    def inference_session(self, max_length: int, **options) -> BlocksSession:
        """A raw session over these blocks (a slice gets a session over its blocks only): `.step(hidden)`
        (positions and mask optional, as in Petals), `.position` (settable: rewinds), `.close()`;
        ``options`` are :meth:`RemoteChain.open_session`'s (adapter, prompts, extras)."""
        if (self.start, self.end) != (0, self.chain.num_blocks):
            options["blocks"] = (self.start, self.end)
        return BlocksSession(self.chain.open_session(max_length, **options))

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


def _chain_from_config(config, dht) -> RemoteChain:
    """A swarm chain for a model config made by `AutoDistributedConfig` (Petals' way of building one)."""
    from corolla.client.sequence_manager import RemoteSequenceManager

    if not hasattr(config, "num_hidden_layers") or not getattr(config, "_name_or_path", None):
        raise TypeError(
            "RemoteSequential takes a RemoteChain or a config from AutoDistributedConfig.from_pretrained"
        )
    return RemoteSequenceManager(config, dht=dht)


def _check_manager_fits(config, manager: RemoteChain) -> None:
    if not isinstance(manager, RemoteChain):
        raise TypeError(f"sequence_manager must be a RemoteSequenceManager, got {type(manager).__name__}")
    layers = getattr(config, "num_hidden_layers", manager.num_blocks)
    if manager.num_blocks != layers:
        raise ValueError(f"the sequence manager has {manager.num_blocks} blocks, the config {layers}")


def _chain_inputs(hidden: torch.Tensor, positions, mask, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, T] (int64, CPU) and mask [B, T] (bool, CPU) for the chain: the given ones, else
    ``first``, ``first + 1``, ... and every token real (`LlamaModel.forward`'s defaults)."""
    batch, tokens = hidden.shape[:2]
    if positions is None:
        positions = first + torch.arange(tokens).unsqueeze(0)
    if mask is None:
        mask = torch.ones(batch, tokens, dtype=torch.bool)
    return positions.to("cpu", torch.long).expand(batch, tokens), mask.cpu().bool()
