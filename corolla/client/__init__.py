"""corolla's client: the swarm chain, sessions and the HF model classes.

Petals' `petals.client` names (`RemoteSequential`, `RemoteSequenceManager`, `InferenceSession`) are exported
here too, lazily, so that `import corolla.client.<module>` stays light.
"""

_LAZY_EXPORTS = {
    "RemoteSequential": "corolla.client.remote_sequential",
    "RemoteSequenceManager": "corolla.client.sequence_manager",
    "InferenceSession": "corolla.client.inference_session",
    "ClientConfig": "corolla.client.config",
}

__all__ = list(_LAZY_EXPORTS)


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'corolla.client' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
