"""Errors raised by `corolla.models`.

They live in their own module so that every other module of the package (layers, families, the
registry, the checkpoint reader) can raise them without import cycles; `corolla.models` and
`corolla.models.registry` re-export them.
"""

from __future__ import annotations


class UnsupportedModelError(ValueError):
    """The checkpoint's `model_type`, or a setting of its config, is not supported by corolla."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read as expected: a file, a tensor or a shape is missing or wrong."""
