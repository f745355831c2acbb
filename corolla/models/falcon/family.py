"""Falcon: the new decoder architecture (parallel attention/MLP, GQA) and the old 7B layout.

Config flags, as transformers reads them:

- `new_decoder_architecture`: grouped QKV with `num_kv_heads`; `num_ln_in_parallel_attn` 2 (default)
  or 1; `multi_query` and `parallel_attn` are ignored for the layout (transformers refuses
  `parallel_attn=False` here by failing; we refuse it with a clear error);
- otherwise `multi_query` (one kv head) or full multi-head (`num_kv_heads` must equal the heads), and
  `parallel_attn` (Falcon-7B) or sequential attention then MLP;
- `alibi`: ALiBi instead of rotary; Falcon's variant rounds slope * position in bfloat16 and divides the
  bias by sqrt(head_dim) (transformers' `FalconModel`), reproduced by `AlibiBias(bf16_slopes=True)`;
- `bias` on every linear, `activation`, `ffn_hidden_size`, `layer_norm_epsilon`, rotary settings in
  `rope_parameters` (the shared `RotaryEmbedding`).
"""

from __future__ import annotations

import math

from corolla.models.errors import UnsupportedModelError
from corolla.models.falcon.block import (
    NEW,
    PARALLEL,
    SEQUENTIAL,
    FalconBlock,
    FalconSpec,
    falcon_state,
    falcon_weight_map,
)
from corolla.models.family import ModelFamily
from corolla.models.layers import AlibiBias, activation, rope_parameters


def _kv_heads(config) -> tuple[int, str]:
    if config.new_decoder_architecture:
        return config.num_kv_heads, "grouped"
    if config.multi_query:
        return 1, "mqa"
    return config.num_attention_heads, "interleaved"


def falcon_spec(config, index: int) -> FalconSpec:
    num_kv, qkv_layout = _kv_heads(config)
    if config.new_decoder_architecture:
        layout = NEW
    else:
        layout = PARALLEL if config.parallel_attn else SEQUENTIAL
    bias = bool(config.bias)
    return FalconSpec(
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=num_kv,
        head_dim=config.hidden_size // config.num_attention_heads,
        rms_norm_eps=config.layer_norm_epsilon,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        layout=layout,
        num_norms=config.num_ln_in_parallel_attn or 2,
        qkv_layout=qkv_layout,
        activation=config.activation,
    )


def check_falcon(config) -> None:
    heads = config.num_attention_heads
    if config.hidden_size % heads:
        raise UnsupportedModelError(f"falcon: hidden_size={config.hidden_size} is not a multiple of {heads} heads")
    activation(config.activation)  # raises on an unknown activation
    if config.new_decoder_architecture:
        if not config.parallel_attn:
            raise UnsupportedModelError("falcon: new_decoder_architecture=True with parallel_attn=False")
        if (config.num_ln_in_parallel_attn or 2) not in (1, 2):
            raise UnsupportedModelError(f"falcon: num_ln_in_parallel_attn={config.num_ln_in_parallel_attn}")
        if heads % config.num_kv_heads:
            raise UnsupportedModelError(f"falcon: {heads} heads cannot share num_kv_heads={config.num_kv_heads}")
    elif not config.multi_query and config.num_kv_heads != heads:
        raise UnsupportedModelError(
            f"falcon: num_kv_heads={config.num_kv_heads} with multi_query=False and the old architecture"
        )
    if not config.alibi:
        rope_parameters(config)  # raises on unsupported rope settings


def falcon_bias(config):
    if not config.alibi:
        return None
    head_dim = config.hidden_size // config.num_attention_heads
    return AlibiBias(config.num_attention_heads, scale=math.sqrt(head_dim), bf16_slopes=True)


FALCON = ModelFamily(
    model_type="falcon",
    block_spec=falcon_spec,
    make_block=FalconBlock,
    weight_map=falcon_weight_map,
    check_config=check_falcon,
    block_prefix="transformer.h.{index}.",
    base_prefix="transformer.",
    embed_name="transformer.word_embeddings.weight",
    norm_name="transformer.ln_f.weight",
    transform_state=falcon_state,
    position_bias=falcon_bias,
    norm_kind="layer",
    norm_eps=lambda config: config.layer_norm_epsilon,
)
