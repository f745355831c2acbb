"""Qwen3: the Llama block with RMSNorm over head_dim on every query and key head (before rotary).

Config: `attention_bias` puts biases on q/k/v and o; sliding windows apply to layers whose
`layer_types[i]` is "sliding_attention" (transformers derives that from `use_sliding_window` and
`max_window_layers`), as for Qwen2.
"""

from __future__ import annotations

from corolla.models.family import BlockSpec, ModelFamily
from corolla.models.llama.block import LlamaBlock, llama_weight_map
from corolla.models.llama.family import check_llama_like, llama_geometry


def qwen3_spec(config, index: int) -> BlockSpec:
    layer_types = getattr(config, "layer_types", None)
    sliding = layer_types is not None and layer_types[index] == "sliding_attention"
    bias = bool(getattr(config, "attention_bias", False))
    return BlockSpec(
        **llama_geometry(config),
        qkv_bias=bias,
        o_bias=bias,
        sliding_window=getattr(config, "sliding_window", None) if sliding else None,
        qk_norm=True,
    )


QWEN3 = ModelFamily(
    model_type="qwen3",
    block_spec=qwen3_spec,
    make_block=LlamaBlock,
    weight_map=llama_weight_map,
    check_config=check_llama_like,
)
