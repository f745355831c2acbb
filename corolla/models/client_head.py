"""`ClientHead`: the pieces of a model the client holds: token embeddings, final norm, LM head.

Public API::

    ClientHead.load(model_ref, *, dtype, device="cpu", revision=None, token=None, cache_dir=None,
                    progress=True) -> ClientHead
    ClientHead.from_config(config, *, dtype, device="cpu") -> ClientHead     # random init
    head.embed(input_ids [B, T]) -> [B, T, H]
    head.logits(hidden [B, T, H]) -> [B, T, vocab]      # final norm + LM head
    head.config

With `tie_word_embeddings` the LM head is the embedding matrix (the checkpoint's `lm_head.weight`, if
any, is not read, as in transformers); otherwise `lm_head.weight` must be in the checkpoint. The HF
tensor names and the kinds of norms (RMSNorm or LayerNorm, BLOOM's LayerNorm after the embeddings,
applied by `embed`) come from the family (`ModelFamily.client_names`, `norm_kind`, `embed_norm_prefix`). Logits come out in the head's dtype;
cast to float before sampling if the head is half precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from corolla.models.errors import CheckpointError
from corolla.models.family import tied_embeddings
from corolla.models.layers import RMSNorm
from corolla.models.registry import get_family, open_checkpoint


class NormedEmbedding(nn.Embedding):
    """Token embeddings followed by a LayerNorm (BLOOM's `word_embeddings_layernorm`).

    Still an `nn.Embedding` (same `weight`, so tied LM heads and `get_input_embeddings` work); its output
    is what the first block takes, so `inputs_embeds` given to the client models are post-norm.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, eps: float, *, dtype=None, device=None):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype, device=device)
        self.norm = nn.LayerNorm(embedding_dim, eps=eps, dtype=dtype, device=device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(input_ids))


def make_norm(kind: str, dim: int, eps: float, *, dtype=None, device=None) -> nn.Module:
    if kind == "rms":
        return RMSNorm(dim, eps, dtype=dtype, device=device)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps, dtype=dtype, device=device)
    raise ValueError(f"unknown norm kind {kind!r}")


class ClientHead(nn.Module):
    def __init__(self, config, *, dtype=None, device="cpu"):
        super().__init__()
        self.config = config
        family = get_family(config.model_type)
        factory = {"dtype": dtype, "device": device}
        eps = family.norm_eps(config)
        if family.embed_norm_prefix is None:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **factory)
        else:
            self.embed_tokens = NormedEmbedding(config.vocab_size, config.hidden_size, eps, **factory)
        self.norm = make_norm(family.norm_kind, config.hidden_size, eps, **factory)
        self.tied = tied_embeddings(config)
        self.lm_head = (
            None if self.tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False, **factory)
        )

    @classmethod
    def from_config(cls, config, *, dtype: torch.dtype, device="cpu") -> ClientHead:
        get_family(config.model_type).check_config(config)
        return cls(config, dtype=dtype, device=device)

    @classmethod
    def load(
        cls,
        model_ref: str,
        *,
        dtype: torch.dtype,
        device="cpu",
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | None = None,
        progress: bool = True,
    ) -> ClientHead:
        """Load the embeddings, final norm and (untied) LM head of a local folder or Hub repo."""
        checkpoint, family, config = open_checkpoint(
            model_ref, revision=revision, token=token, cache_dir=cache_dir
        )
        names = family.client_names(config)
        tensors = checkpoint.load_tensors(list(names.values()), dtype=dtype, device=device, progress=progress)
        head = cls(config, dtype=dtype, device="meta")
        expected = dict(head.named_parameters())
        state = {}
        for ours, name in names.items():
            shape = tuple(expected[ours].shape)
            if tuple(tensors[name].shape) != shape:
                raise CheckpointError(f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
            state[ours] = tensors[name]
        head.load_state_dict(state, strict=True, assign=True)
        return head

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.norm(hidden), weight)
