"""Reference stand-ins for the four Petals internals that Petals' client tests import as test references or
constants (and nothing else): ``load_pretrained_block``, ``UID_DELIMITER``, ``DUMMY_KEY_PAST`` and
``MAX_SHORT_INFERENCE_TOKENS``. Every other name those tests use comes from corolla itself.

The reference block is transformers' own decoder layer with the checkpoint's weights (loaded by
``AutoModelForCausalLM.from_pretrained``), called the way Petals' wrapped blocks are called:
``block(hidden)`` returns ``(hidden,)``, and ``block(hidden, use_cache=True, layer_past=(k, v))`` returns
``(hidden, (k, v))`` with the keys and values of every position so far. It computes the rotary embeddings
for the positions after the past, and a causal mask aligned to the end of the past. Nothing of corolla's
model code is used, so the converted tests compare corolla's swarm against transformers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM

#: Petals' `petals.data_structures.UID_DELIMITER`: a block's uid is f"{dht_prefix}{UID_DELIMITER}{index}"
UID_DELIMITER = "."
#: Petals' `petals.utils.misc.DUMMY_KEY_PAST`: an empty past (no cache yet)
DUMMY_KEY_PAST = torch.empty((0, 0, 0))
#: Petals' `petals.server.block_functions.MAX_SHORT_INFERENCE_TOKENS` (Petals merges shorter steps into one
#: batch on its servers; the tests use it only as a length)
MAX_SHORT_INFERENCE_TOKENS = 128


class _PastCache:
    """The duck-typed cache a transformers attention layer updates: keys/values [B, heads, T, D]."""

    def __init__(self, key: torch.Tensor | None, value: torch.Tensor | None):
        self.key, self.value = key, value

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.key is not None:
            key, value = torch.cat([self.key, key], dim=-2), torch.cat([self.value, value], dim=-2)
        self.key, self.value = key, value
        return key, value


class ReferenceBlock(nn.Module):
    """One transformers decoder layer, with its model's rotary embedding, called like Petals' blocks."""

    def __init__(self, layer: nn.Module, rotary_emb: nn.Module):
        super().__init__()
        self.layer, self.rotary_emb = layer, rotary_emb

    def forward(self, hidden_states: torch.Tensor, *, layer_past=None, use_cache: bool = False):
        batch, tokens = hidden_states.shape[:2]
        past_key, past_value = layer_past if layer_past is not None else (None, None)
        if past_key is not None and past_key.numel() == 0:  # DUMMY_KEY_PAST
            past_key = past_value = None
        past = 0 if past_key is None else past_key.shape[-2]
        positions = torch.arange(past, past + tokens).unsqueeze(0).expand(batch, tokens)
        allowed = torch.ones(tokens, past + tokens, dtype=torch.bool).tril(diagonal=past)
        mask = torch.zeros(allowed.shape, dtype=hidden_states.dtype).masked_fill(
            ~allowed, torch.finfo(hidden_states.dtype).min
        )
        cache = _PastCache(past_key, past_value)
        out = self.layer(
            hidden_states,
            attention_mask=mask[None, None].expand(batch, 1, tokens, past + tokens),
            position_ids=positions,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=self.rotary_emb(hidden_states, positions),
        )
        out = out[0] if isinstance(out, tuple) else out
        return (out, (cache.key, cache.value)) if use_cache else (out,)


def load_pretrained_block(model_name: str, block_index: int, *, torch_dtype: torch.dtype = torch.float32):
    """Block ``block_index`` of ``model_name`` as transformers loads it (Petals' `load_pretrained_block`)."""
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch_dtype)
    model.train(False)
    return ReferenceBlock(model.model.layers[block_index], model.model.rotary_emb)
