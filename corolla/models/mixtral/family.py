"""Mixtral: sparse mixture-of-experts blocks (router top-k), hosted whole on the server."""

from __future__ import annotations

from corolla.models.errors import UnsupportedModelError
from corolla.models.family import ModelFamily
from corolla.models.llama.family import check_llama_like, llama_geometry
from corolla.models.mixtral.block import MixtralBlock, MoESpec, mixtral_weight_map


def mixtral_spec(config, index: int) -> MoESpec:
    return MoESpec(
        **llama_geometry(config),
        sliding_window=getattr(config, "sliding_window", None),
        num_experts=config.num_local_experts,
        experts_per_token=config.num_experts_per_tok,
    )


def check_mixtral(config) -> None:
    check_llama_like(config)
    if not 1 <= config.num_experts_per_tok <= config.num_local_experts:
        raise UnsupportedModelError(
            f"mixtral: num_experts_per_tok={config.num_experts_per_tok} must be within "
            f"[1, num_local_experts={config.num_local_experts}]"
        )


MIXTRAL = ModelFamily(
    model_type="mixtral",
    block_spec=mixtral_spec,
    make_block=MixtralBlock,
    weight_map=mixtral_weight_map,
    check_config=check_mixtral,
)
