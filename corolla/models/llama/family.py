"""The Llama-like families: `llama`, `mistral` and `qwen2`, all on `LlamaBlock`.

They differ only in what their configs say:

- llama: optional biases (`attention_bias` on q/k/v/o, `mlp_bias`), full attention;
- mistral: no biases; `sliding_window` (None or an int) applies to every layer;
- qwen2: bias on q/k/v (not o); sliding window only on layers whose `layer_types[i]` is
  "sliding_attention" (transformers sets that from `use_sliding_window` and `max_window_layers`).
"""

from __future__ import annotations

from corolla.models.errors import UnsupportedModelError
from corolla.models.family import BlockSpec, ModelFamily
from corolla.models.layers import rope_parameters
from corolla.models.llama.block import LlamaBlock, llama_weight_map


def llama_geometry(config) -> dict:
    return {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "rms_norm_eps": config.rms_norm_eps,
    }


def check_llama_like(config) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{config.model_type}: hidden_act={act!r} is not supported (only 'silu')")
    rope_parameters(config)  # raises on unsupported rope settings


def llama_spec(config, index: int) -> BlockSpec:
    bias = bool(getattr(config, "attention_bias", False))
    return BlockSpec(
        **llama_geometry(config), qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False))
    )


def mistral_spec(config, index: int) -> BlockSpec:
    return BlockSpec(**llama_geometry(config), sliding_window=getattr(config, "sliding_window", None))


def qwen2_spec(config, index: int) -> BlockSpec:
    layer_types = getattr(config, "layer_types", None)
    sliding = layer_types is not None and layer_types[index] == "sliding_attention"
    window = getattr(config, "sliding_window", None) if sliding else None
    return BlockSpec(**llama_geometry(config), qkv_bias=True, sliding_window=window)


def _family(model_type: str, spec) -> ModelFamily:
    return ModelFamily(
        model_type=model_type,
        block_spec=spec,
        make_block=LlamaBlock,
        weight_map=llama_weight_map,
        check_config=check_llama_like,
    )


LLAMA = _family("llama", llama_spec)
MISTRAL = _family("mistral", mistral_spec)
QWEN2 = _family("qwen2", qwen2_spec)
FAMILIES = (LLAMA, MISTRAL, QWEN2)
