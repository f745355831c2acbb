"""Prompt tuning on the client: trainable virtual tokens in front of every sequence (Petals' names).

``tuning_mode="ptune"`` learns ``pre_seq_len`` input embeddings (:attr:`PromptTuning.prompt_embeddings`)
prepended to every sequence; ``"deep_ptune"`` also learns, for every block, vectors added to those
positions' hidden states before the block (:attr:`PromptTuning.intermediate_prompt_embeddings`, zero at
the start, so training starts from plain prompt tuning). The prompts live on the client; deep prompts
travel with the hidden states and their gradients come back (``corolla.client.remote_autograd``).

Decisions:

- **Virtual tokens at the front.** The K prompts are real tokens (mask 1) at positions 0..K-1; the
  sequence's own positions shift by K. A forward without ``position_ids`` uses 0..K+T-1 (what
  ``LlamaModel.forward`` does with ``inputs_embeds = cat(prompts, embeds)``); given ``position_ids``
  shift by K. Outputs of the prompt positions are dropped: logits, losses and pooled outputs are over the
  caller's tokens only.
- **Generation.** :class:`PromptedChainSession` wraps a chain session: the first step sends the prompts
  before the caller's tokens (with the deep prompts, which the servers add to cache positions < K), later
  steps shift positions by K, and ``position`` hides the prefix, so ``GenerationSession`` and transformers'
  ``generate`` see an ordinary session. The prefix goes into the servers' caches once per session; deep
  prompts ride along with the steps that cover it, replays after a failover included.
- Prompts are the same for every row, so deep prompts are sent with batch 1 (the servers broadcast).
"""

from __future__ import annotations

import torch
from torch import nn

from corolla.client.chain import ChainSession, RouteHop

__all__ = ["TUNING_MODES", "PromptTuning", "PromptedChainSession"]

TUNING_MODES = ("ptune", "deep_ptune")


class PromptTuning(nn.Module):
    """The trainable prompts of one client model."""

    def __init__(self, config, tuning_mode: str, pre_seq_len: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        if tuning_mode not in TUNING_MODES:
            raise ValueError(f"tuning_mode must be one of {TUNING_MODES} (or None), got {tuning_mode!r}")
        if not isinstance(pre_seq_len, int) or pre_seq_len < 1:
            raise ValueError(
                f"pre_seq_len must be a positive int with tuning_mode={tuning_mode!r}, got {pre_seq_len!r}"
            )
        self.tuning_mode, self.pre_seq_len = tuning_mode, pre_seq_len
        self.num_blocks, self.hidden_size = config.num_hidden_layers, config.hidden_size
        self.prompt_embeddings = nn.Embedding(pre_seq_len, config.hidden_size, dtype=dtype)
        with torch.no_grad():
            self.prompt_embeddings.weight.normal_(0.0, getattr(config, "initializer_range", 0.02))
        self.intermediate_prompt_embeddings = None
        if tuning_mode == "deep_ptune":
            self.intermediate_prompt_embeddings = nn.Embedding(
                pre_seq_len, self.num_blocks * config.hidden_size, dtype=dtype
            )
            with torch.no_grad():
                self.intermediate_prompt_embeddings.weight.zero_()

    def prompts(self) -> torch.Tensor:
        """[1, K, H]: the input prompts."""
        return self.prompt_embeddings.weight.unsqueeze(0)

    def deep_prompts(self) -> torch.Tensor | None:
        """[num_blocks, 1, K, H] (deep_ptune) or None."""
        if self.intermediate_prompt_embeddings is None:
            return None
        weight = self.intermediate_prompt_embeddings.weight  # [K, blocks * H]
        return weight.view(self.pre_seq_len, self.num_blocks, self.hidden_size).permute(1, 0, 2).unsqueeze(1)

    def extend(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prepend the prompts to ``hidden`` [B, T, H]; returns (hidden, mask, positions) over K + T tokens."""
        batch, length = hidden.shape[:2]
        k, device = self.pre_seq_len, hidden.device
        prompts = self.prompts().to(hidden.dtype).expand(batch, -1, -1)
        hidden = torch.cat([prompts.to(device), hidden], dim=1)
        ones = torch.ones(batch, k, dtype=torch.bool, device=device)
        mask = (
            torch.ones(batch, length, dtype=torch.bool, device=device)
            if attention_mask is None
            else attention_mask
        )
        mask = torch.cat([ones, mask.to(device).bool()], dim=1)
        if position_ids is None:
            positions = torch.arange(k + length, device=device).expand(batch, -1)
        else:
            head = torch.arange(k, device=device).expand(batch, -1)
            positions = torch.cat([head, position_ids.to(device).long().expand(batch, -1) + k], dim=1)
        return hidden, mask, positions

    def run(
        self,
        decoder,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """``decoder`` (a ``RemoteDecoderModel``) with the prompts: hidden states [B, T, H] after the final norm."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = decoder.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        hidden, mask, positions = self.extend(hidden, attention_mask, position_ids)
        out = decoder.layers(hidden, attention_mask=mask, position_ids=positions, prompts=self.deep_prompts())
        return decoder.norm(out[:, self.pre_seq_len :])

    def open_session(self, layers, max_length: int) -> PromptedChainSession:
        """A chain session over every block of ``layers`` (a ``RemoteSequential``) that starts with the prompts."""
        with torch.no_grad():
            prompts, deep = self.prompts().detach().cpu(), self.deep_prompts()
            deep = None if deep is None else deep.detach().cpu().contiguous()
        inner = layers.inference_session(max_length + self.pre_seq_len, prompts=deep)
        return PromptedChainSession(inner, prompts, max_length)


class PromptedChainSession(ChainSession):
    """A chain session whose first K cache positions hold the prompts; callers see positions after them."""

    def __init__(self, inner: ChainSession, prompts: torch.Tensor, max_length: int):
        self.inner, self.prompts, self.max_length = inner, prompts, max_length
        self.pre_seq_len = prompts.shape[1]

    @property
    def position(self) -> int:
        return max(0, self.inner.position - self.pre_seq_len)

    def step(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor,
        hypo_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        k = self.pre_seq_len
        if self.inner.position > 0:
            return self.inner.step(hidden, positions + k, attention_mask, hypo_ids=hypo_ids)
        batch = hidden.shape[0]
        hidden = torch.cat([self.prompts.to(hidden.dtype).expand(batch, -1, -1), hidden], dim=1)
        positions = torch.cat([torch.arange(k).expand(batch, -1), positions + k], dim=1)
        mask = torch.cat([torch.ones(batch, k, dtype=torch.bool), attention_mask.bool()], dim=1)
        return self.inner.step(hidden, positions, mask)[:, k:]

    def rewind(self, position: int) -> None:
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind a session holding {self.position} tokens to {position}")
        self.inner.rewind(position + self.pre_seq_len if position else 0)  # at 0 the prompts are sent again

    @property
    def failovers(self) -> int:
        return self.inner.failovers

    def describe_route(self) -> list[RouteHop]:
        return self.inner.describe_route()

    def close(self) -> None:
        self.inner.close()
