"""Mixtral: Mistral attention with a sparse mixture of experts."""

from corolla.models.mixtral.block import MixtralBlock, MoESpec, SparseMoE
from corolla.models.mixtral.family import MIXTRAL

FAMILIES = (MIXTRAL,)

__all__ = ["FAMILIES", "MIXTRAL", "MixtralBlock", "MoESpec", "SparseMoE"]
