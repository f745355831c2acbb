"""Tiny random checkpoints written by transformers itself (sharded safetensors + index).

`CONFIGS` are the tiny configs of every supported family, each exercising its special features;
`make_checkpoint` saves one with weights re-drawn larger than transformers' init (std 0.02 makes
attention nearly uniform and hides bugs) and norm weights perturbed away from 1 so that a misplaced
norm shows up.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen3Config,
)


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
    "qwen3-sliding-bias": lambda: Qwen3Config(
        **COMMON,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        attention_bias=True,
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=2,
        tie_word_embeddings=False,
    ),
    "mixtral-top2-sliding": lambda: MixtralConfig(
        **COMMON,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=5,
    ),
    "bloom": lambda: BloomConfig(vocab_size=96, hidden_size=32, n_layer=4, n_head=4, pad_token_id=0),
    "bloom-6heads-postln-residual": lambda: BloomConfig(
        vocab_size=96,
        hidden_size=36,
        n_layer=4,
        n_head=6,
        pad_token_id=0,
        apply_residual_connection_post_layernorm=True,
        layer_norm_epsilon=1e-3,
    ),
    "falcon-new-gqa": lambda: FalconConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
        pad_token_id=0,
    ),  # fmt: skip
    "falcon-new-1ln-bias-untied": lambda: FalconConfig(
        vocab_size=96,
        hidden_size=48,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_kv_heads=3,
        new_decoder_architecture=True,
        num_ln_in_parallel_attn=1,
        bias=True,
        tie_word_embeddings=False,
        ffn_hidden_size=40,
        pad_token_id=0,
    ),  # fmt: skip
    "falcon-7b-mqa": lambda: FalconConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        multi_query=True,
        parallel_attn=True,
        pad_token_id=0,
    ),  # fmt: skip
    "falcon-sequential-mha-bias": lambda: FalconConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        multi_query=False,
        parallel_attn=False,
        bias=True,
        pad_token_id=0,
    ),  # fmt: skip
    "falcon-alibi": lambda: FalconConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
        alibi=True,
        pad_token_id=0,
    ),  # fmt: skip
}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if ("norm" in name or ".ln_" in name) and name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif "norm" in name or ".ln_" in name:
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


def tame_init(model: torch.nn.Module, seed: int = 0, logit_gain: float = 4.0) -> None:
    """Non-pathological random weights: unit-gain projections (std 1/sqrt(fan_in)), residual outputs
    scaled by 1/sqrt(2 * layers) (GPT-2's init), norms near 1, and an LM head giving logits of std
    about `logit_gain` (peaked like a real LM's). For closeness tests of quantization."""
    import math

    layers = model.config.num_hidden_layers
    residual_outputs = ("o_proj", "down_proj", "self_attention.dense.", "dense_4h_to_h", ".w2.")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:
                param.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.05 * noise)
            elif "embed" in name:
                param.copy_(noise)
            elif "lm_head" in name:
                param.copy_(noise * logit_gain / math.sqrt(param.shape[1]))
            elif any(part in name for part in residual_outputs):
                param.copy_(noise / math.sqrt(param.shape[1] * 2 * layers))
            else:
                param.copy_(noise / math.sqrt(param.shape[1]))


def write_tame(config, path: Path, seed: int = 0, max_shard_size: str = "200KB"):
    """A checkpoint of `config` with `tame_init` weights; returns the transformers model."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).eval()
    tame_init(model, seed)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return model
