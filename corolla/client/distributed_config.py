"""`AutoDistributedConfig`: a model's config with the client's swarm settings on it, as Petals scripts use it.

``AutoDistributedConfig.from_pretrained(model, initial_peers=[...], dht_prefix=..., **client_options)`` reads
the model's config (a folder, Hub repo or GGUF file) and sets every client setting on it as an attribute
(`config.initial_peers`, `config.dht_prefix`, `config.request_timeout`, ...: the fields of
`corolla.client.config.ClientConfig`, with their defaults), so that ``RemoteSequential(config, dht=dht)`` and
scripts reading ``config.num_hidden_layers`` or ``config.initial_peers`` work unchanged. Unknown options are
refused by name. The settings are not part of the model's identity: the swarm sees the same config hash.
"""

from __future__ import annotations

import dataclasses

from corolla.client.config import ClientConfig
from corolla.models.checkpoint import Checkpoint, default_dht_prefix

__all__ = ["AutoDistributedConfig", "client_options_of"]


class AutoDistributedConfig:
    """Reads a model's config and adds the client's swarm settings (Petals' `AutoDistributedConfig`)."""

    def __init__(self, *args, **kwargs):
        raise TypeError("use AutoDistributedConfig.from_pretrained(...)")

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, *, revision=None, token=None, **client_options):
        fields = {f.name: f for f in dataclasses.fields(ClientConfig)}
        unknown = sorted(set(client_options) - set(fields))
        if unknown:
            raise TypeError(f"unknown client options: {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        ref = str(model_name_or_path)
        config = Checkpoint(ref, revision=revision, token=token).config
        settings = dataclasses.asdict(ClientConfig(**client_options))
        if settings["dht_prefix"] is None:
            settings["dht_prefix"] = default_dht_prefix(ref)
        for name, value in settings.items():
            setattr(config, name, list(value) if isinstance(value, tuple) else value)
        config._name_or_path = ref
        return config


def client_options_of(config) -> dict:
    """The client settings an AutoDistributedConfig carries (what `ClientConfig` takes)."""
    names = [f.name for f in dataclasses.fields(ClientConfig)]
    return {name: getattr(config, name) for name in names if hasattr(config, name)}
