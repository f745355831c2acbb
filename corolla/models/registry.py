"""The family registry, keyed by HF `model_type` (the `model_type` field of config.json).

A family is registered here once it passes the parity tests in `tests/models`. `get_family` is the one
entry point; an unknown type raises `UnsupportedModelError` naming it and listing what is supported.
"""

from __future__ import annotations

from corolla.models.bloom import FAMILIES as _BLOOM_FAMILIES
from corolla.models.checkpoint import Checkpoint
from corolla.models.errors import UnsupportedModelError
from corolla.models.falcon import FAMILIES as _FALCON_FAMILIES
from corolla.models.family import ModelFamily
from corolla.models.llama import FAMILIES as _LLAMA_FAMILIES
from corolla.models.mixtral import FAMILIES as _MIXTRAL_FAMILIES
from corolla.models.qwen3 import FAMILIES as _QWEN3_FAMILIES

__all__ = ["UnsupportedModelError", "get_family", "supported_model_types"]

_REGISTRY: dict[str, ModelFamily] = {
    family.model_type: family
    for family in (*_LLAMA_FAMILIES, *_QWEN3_FAMILIES, *_MIXTRAL_FAMILIES, *_BLOOM_FAMILIES, *_FALCON_FAMILIES)
}


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_family(model_type: str) -> ModelFamily:
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by corolla; supported: {', '.join(supported_model_types())}"
        ) from None


def open_checkpoint(model_ref: str, *, revision=None, token=None, cache_dir=None):
    """(checkpoint, family, config) of a folder or Hub repo, the config checked against its family."""
    checkpoint = Checkpoint(model_ref, revision=revision, token=token, cache_dir=cache_dir)
    family = get_family(checkpoint.raw_config.get("model_type"))
    checkpoint.use_prefix(family.base_prefix)
    config = checkpoint.config
    family.check_config(config)
    return checkpoint, family, config
