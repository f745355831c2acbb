"""BLOOM: ALiBi, LayerNorm blocks, the embeddings' LayerNorm on the client."""

from corolla.models.bloom.block import BloomBlock, BloomSpec
from corolla.models.bloom.family import BLOOM

FAMILIES = (BLOOM,)

__all__ = ["BLOOM", "FAMILIES", "BloomBlock", "BloomSpec"]
