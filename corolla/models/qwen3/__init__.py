"""Qwen3: the Llama block plus per-head q/k RMSNorm."""

from corolla.models.qwen3.family import QWEN3

FAMILIES = (QWEN3,)

__all__ = ["FAMILIES", "QWEN3"]
