"""corolla: run large language models BitTorrent-style.

The model classes are exported lazily (PEP 562 `__getattr__`), so `import corolla` stays light: torch
and transformers load only when a class is first used (`from corolla import AutoDistributedModelForCausalLM`).
"""

__version__ = "0.1.0"

# Errors a user can catch; light to import (no torch).
from corolla.wire.errors import (  # noqa: E402
    AdapterLimitError,
    BadRequestError,
    CacheFullError,
    ChainFailedError,
    ClientLimitError,
    CorollaError,
    MissingBlocksError,
    NotAMemberError,
    RemoteError,
    ServerBusyError,
    ServerRefusedError,
    SessionLengthError,
    UnknownAdapterError,
)

_LAZY_EXPORTS = {
    "AutoDistributedModelForCausalLM": "corolla.client.model",
    "DistributedModelForCausalLM": "corolla.client.model",
    "DistributedLlamaForCausalLM": "corolla.client.model",
    "DistributedMistralForCausalLM": "corolla.client.model",
    "DistributedQwen2ForCausalLM": "corolla.client.model",
    "DistributedQwen3ForCausalLM": "corolla.client.model",
    "DistributedMixtralForCausalLM": "corolla.client.model",
    "DistributedBloomForCausalLM": "corolla.client.model",
    "DistributedFalconForCausalLM": "corolla.client.model",
    "RemoteSequential": "corolla.client.remote_sequential",
    "AutoDistributedConfig": "corolla.client.distributed_config",
    "RemoteSequenceManager": "corolla.client.sequence_manager",
    "AutoDistributedSpeculativeModel": "corolla.client.speculative_model",
    "DistributedModelForSpeculativeGeneration": "corolla.client.speculative_model",
    "DistributedLlamaForSpeculativeGeneration": "corolla.client.speculative_model",
    "DistributedMistralForSpeculativeGeneration": "corolla.client.speculative_model",
    "DistributedQwen2ForSpeculativeGeneration": "corolla.client.speculative_model",
    "DistributedQwen3ForSpeculativeGeneration": "corolla.client.speculative_model",
    "DistributedMixtralForSpeculativeGeneration": "corolla.client.speculative_model",
    "DistributedBloomForSpeculativeGeneration": "corolla.client.speculative_model",
    "DistributedFalconForSpeculativeGeneration": "corolla.client.speculative_model",
    "RemoteLora": "corolla.client.lora",
    "AutoDistributedModelForSequenceClassification": "corolla.client.classification",
    "DistributedModelForSequenceClassification": "corolla.client.classification",
    "DistributedLlamaForSequenceClassification": "corolla.client.classification",
    "DistributedMistralForSequenceClassification": "corolla.client.classification",
    "DistributedQwen2ForSequenceClassification": "corolla.client.classification",
    "DistributedQwen3ForSequenceClassification": "corolla.client.classification",
    "DistributedMixtralForSequenceClassification": "corolla.client.classification",
    "DistributedBloomForSequenceClassification": "corolla.client.classification",
    "DistributedFalconForSequenceClassification": "corolla.client.classification",
}

__all__ = [
    "__version__",
    "AdapterLimitError",
    "BadRequestError",
    "CacheFullError",
    "ChainFailedError",
    "ClientLimitError",
    "CorollaError",
    "MissingBlocksError",
    "NotAMemberError",
    "RemoteError",
    "ServerBusyError",
    "ServerRefusedError",
    "SessionLengthError",
    "UnknownAdapterError",
    *_LAZY_EXPORTS,
]


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'corolla' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
