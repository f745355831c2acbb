"""Tiny random checkpoints written by transformers itself (sharded safetensors + index)."""

from __future__ import annotations

from pathlib import Path

import torch


def write_llama(path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama saved by transformers itself, as sharded safetensors with an index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    params = dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=320, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.08,
    )  # fmt: skip
    params.update(overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**params))
    model.save_pretrained(path, max_shard_size="100KB")
    return path
