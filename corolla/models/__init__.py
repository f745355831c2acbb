"""Model code in plain torch: shared layers, per-family blocks, checkpoint reading, the family registry.

The server builds a `BlockStack` (blocks [start, end) with a preallocated `LayerCache` per block and
session); the client builds a `ClientHead` (embeddings, final norm, LM head). Both load only their own
tensors from a local folder or a Hub repo (`Checkpoint`). `config_hash` and `default_dht_prefix` give a
model's identity in the swarm. This package imports no network code.
"""

from corolla.models.cache import LayerCache
from corolla.models.checkpoint import Checkpoint, config_hash, default_dht_prefix
from corolla.models.client_head import ClientHead
from corolla.models.errors import CheckpointError, UnsupportedModelError
from corolla.models.registry import get_family, supported_model_types
from corolla.models.stack import BlockStack

__all__ = [
    "BlockStack",
    "Checkpoint",
    "CheckpointError",
    "ClientHead",
    "LayerCache",
    "UnsupportedModelError",
    "config_hash",
    "default_dht_prefix",
    "get_family",
    "supported_model_types",
]
