"""BLOOM: ALiBi positions, LayerNorm after the word embeddings (client side), fused per-head QKV.

Config: `n_head`/`hidden_size` (every head is a kv head), MLP width 4 * hidden, `layer_norm_epsilon`
for every LayerNorm, `apply_residual_connection_post_layernorm`. `pretraining_tp > 1` with
`slow_but_exact` (a sliced matmul that rounds differently) is refused; `pretraining_tp` alone changes
nothing at inference.
"""

from __future__ import annotations

from corolla.models.bloom.block import BloomBlock, BloomSpec, bloom_state, bloom_weight_map
from corolla.models.errors import UnsupportedModelError
from corolla.models.family import ModelFamily
from corolla.models.layers import AlibiBias


def bloom_spec(config, index: int) -> BloomSpec:
    heads = config.n_head
    return BloomSpec(
        hidden_size=config.hidden_size,
        intermediate_size=4 * config.hidden_size,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=config.hidden_size // heads,
        rms_norm_eps=config.layer_norm_epsilon,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        residual_post_layernorm=bool(config.apply_residual_connection_post_layernorm),
    )


def check_bloom(config) -> None:
    if config.hidden_size % config.n_head:
        raise UnsupportedModelError(f"bloom: hidden_size={config.hidden_size} is not a multiple of n_head")
    if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
        raise UnsupportedModelError("bloom: slow_but_exact=True with pretraining_tp > 1 is not supported")


BLOOM = ModelFamily(
    model_type="bloom",
    block_spec=bloom_spec,
    make_block=BloomBlock,
    weight_map=bloom_weight_map,
    check_config=check_bloom,
    block_prefix="transformer.h.{index}.",
    base_prefix="transformer.",
    embed_name="transformer.word_embeddings.weight",
    norm_name="transformer.ln_f.weight",
    transform_state=bloom_state,
    position_bias=lambda config: AlibiBias(config.n_head),
    norm_kind="layer",
    norm_eps=lambda config: config.layer_norm_epsilon,
    embed_norm_prefix="transformer.word_embeddings_layernorm.",
)
