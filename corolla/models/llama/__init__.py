"""Llama and the families that share its block (Mistral, Qwen2)."""

from corolla.models.llama.block import LlamaBlock, llama_weight_map
from corolla.models.llama.family import FAMILIES, LLAMA, MISTRAL, QWEN2

__all__ = ["FAMILIES", "LLAMA", "MISTRAL", "QWEN2", "LlamaBlock", "llama_weight_map"]
