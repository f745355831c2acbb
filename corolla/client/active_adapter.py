"""Which served LoRA adapter a request uses: a context variable set around a call, else the client's option.

Servers started with ``--adapters`` announce them; a request names one and routing uses only servers that
announce it. The choice is, from the most to the least specific: the ``active_adapter`` given to
``generate`` / ``inference_session`` (held in a context variable for the call, :func:`using_adapter`), else
the client's ``active_adapter`` option (``from_pretrained(..., active_adapter=NAME)``, Petals' name), else
none (the base model). Kept apart from :mod:`corolla.client.lora` (the client's own LoRA training), so that
routing and sessions do not load the training code.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

_ADAPTER: contextvars.ContextVar[str | None] = contextvars.ContextVar("corolla_active_adapter", default=None)


@contextmanager
def using_adapter(name: str | None) -> Iterator[None]:
    """Requests and sessions started inside (in this thread) use served adapter ``name`` (None: the default)."""
    token = _ADAPTER.set(name)
    try:
        yield
    finally:
        _ADAPTER.reset(token)


def adapter_in_context() -> bool:
    """Whether a caller chose the adapter for calls started now (an explicit choice wins over defaults)."""
    return _ADAPTER.get() is not None


def current_adapter(default: str | None = None) -> str | None:
    """The adapter a request started now should use ("" or None = the base model)."""
    chosen = _ADAPTER.get()
    return (chosen if chosen is not None else default) or None
