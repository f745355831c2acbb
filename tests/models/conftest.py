"""Tiny random checkpoints written by transformers' own `save_pretrained` (sharded safetensors + index).

Weights are re-drawn larger than transformers' init (std 0.02 makes attention nearly uniform and hides
bugs); norm weights are perturbed away from 1 so that a misplaced norm shows up.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

torch.set_num_threads(2)

COMMON = {"vocab_size": 96, "intermediate_size": 48, "num_hidden_layers": 4, "pad_token_id": 0}

CONFIGS = {
    "llama-mha": lambda: LlamaConfig(
        **COMMON, hidden_size=32, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False
    ),
    "llama-gqa-headdim-llama3-tied": lambda: LlamaConfig(
        **COMMON,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        max_position_embeddings=64,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500.0,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama-mqa-linear-bias": lambda: LlamaConfig(
        **COMMON,
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=8,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
        rope_scaling={"type": "linear", "factor": 2.0},
        rope_theta=1000.0,
    ),
    "llama-dynamic": lambda: LlamaConfig(
        **COMMON,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 100.0, "factor": 2.0},
    ),
    "mistral-sliding": lambda: MistralConfig(
        **COMMON, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=3
    ),
    "mistral-full": lambda: MistralConfig(
        **COMMON, hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=12, sliding_window=None
    ),
    "qwen2-sliding": lambda: Qwen2Config(
        **COMMON,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=2,
        tie_word_embeddings=True,
    ),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif "embed" in name:
                param.copy_(noise)
            else:
                param.copy_(0.15 * noise)


def make_checkpoint(config, path, *, seed: int = 0, max_shard_size: str = "24KB"):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    randomize(model, seed)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return model


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(name, folder, transformers model) for each tiny config."""
    path = tmp_path_factory.mktemp(request.param)
    model = make_checkpoint(CONFIGS[request.param](), path)
    return request.param, str(path), model


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory):
    """One GQA Llama checkpoint for loader tests: (folder, transformers model)."""
    path = tmp_path_factory.mktemp("llama-loader")
    model = make_checkpoint(CONFIGS["llama-gqa-headdim-llama3-tied"](), path, seed=1)
    return str(path), model
