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

from corolla.client.config import ClientConfig, client_config
from corolla.models.checkpoint import Checkpoint, default_dht_prefix

__all__ = ["AutoDistributedConfig", "client_options_of", "petals_manager_args"]


class AutoDistributedConfig:
    """Reads a model's config and adds the client's swarm settings (Petals' `AutoDistributedConfig`)."""

    def __init__(self, *args, **kwargs):
        raise TypeError("use AutoDistributedConfig.from_pretrained(...)")

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, *, revision=None, token=None, **client_options):
        settings = dataclasses.asdict(client_config(**client_options))  # unknown options refused by name
        ref = str(model_name_or_path)
        config = Checkpoint(ref, revision=revision, token=token).config
        if settings["dht_prefix"] is None:
            settings["dht_prefix"] = default_dht_prefix(ref)
        for name, value in settings.items():  # lists, not tuples or sets: the config stays JSON-serializable
            setattr(config, name, sorted(value) if isinstance(value, frozenset) else _plain(value))
        config._name_or_path = ref
        return config


def client_options_of(config) -> dict:
    """The client settings an AutoDistributedConfig carries (what `ClientConfig` takes)."""
    names = [f.name for f in dataclasses.fields(ClientConfig)]
    return {name: getattr(config, name) for name in names if hasattr(config, name)}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def petals_manager_args(config, block_uids=None, *, dht=None, state=None) -> dict:
    """What Petals' ``RemoteSequenceManager(config, block_uids, dht=dht)`` means in corolla's terms: the
    arguments of `corolla.client.sequence_manager._swarm_parts` (model_ref, config, initial_peers, dht_prefix,
    options). ``block_uids`` must be every block's uid, ``f"{dht_prefix}.{i}"`` in order (a manager covers the
    whole model; slice the `RemoteSequential` instead); a hivemind ``DHT`` lends its addresses as initial
    peers (corolla's client runs its own DHT node; it does not share the hivemind one)."""
    if state is not None:
        raise NotImplementedError(
            "state= (Petals' SequenceManagerState, shared between managers) is not supported"
        )
    if not hasattr(config, "num_hidden_layers") or not getattr(config, "_name_or_path", None):
        raise TypeError("expected a ClientConfig, or a model config from AutoDistributedConfig.from_pretrained")
    options = client_options_of(config)
    initial_peers = list(options.pop("initial_peers", None) or ())
    dht_prefix = options.pop("dht_prefix", None) or default_dht_prefix(config._name_or_path)
    if block_uids is not None:
        expected = [f"{dht_prefix}.{i}" for i in range(config.num_hidden_layers)]
        if list(block_uids) != expected:
            raise ValueError(
                f"block_uids must be every block of the model in order ({expected[0]} ... {expected[-1]}); "
                "to use some blocks, slice the RemoteSequential (sequential[3:6])"
            )
    if dht is not None:  # a hivemind DHT object, as Petals scripts create: join through its addresses
        initial_peers += [str(addr) for addr in dht.get_visible_maddrs()]
    if not initial_peers:
        raise ValueError(
            "no initial peers: set initial_peers in AutoDistributedConfig.from_pretrained or pass dht="
        )
    return dict(
        model_ref=config._name_or_path, config=config, initial_peers=initial_peers, dht_prefix=dht_prefix,
        options=options,
    )  # fmt: skip
