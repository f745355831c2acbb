"""Falcon: new decoder architecture (parallel attention/MLP, GQA) and the old 7B layout."""

from corolla.models.falcon.block import FalconBlock, FalconSpec
from corolla.models.falcon.family import FALCON

FAMILIES = (FALCON,)

__all__ = ["FALCON", "FAMILIES", "FalconBlock", "FalconSpec"]
