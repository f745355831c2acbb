"""Records that servers announce in the DHT: :class:`ServerInfo`, one per server and hosted block.

The record is packed with the same typed codec as the messages (no pickle, no free-form dicts), wrapped
in a :class:`RecordClaim` signed by its writer (:class:`SignedRecord`; sealed with the swarm key in a
private swarm, see :mod:`corolla.swarm.trust`) and stored under the key ``"{dht_prefix}.{block}"`` with the
server's peer id as subkey. A reader checks the signature, place and expiry, and skips what fails.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

#: 2: probe, training, adapter and LoRA messages; 3: server-to-server push of inference steps; 4: beam reordering
#: (hypo_ids) in inference steps; 5: signed records, member proofs of private swarms
WIRE_VERSION = 5
MAX_RECORD_BYTES = 16 * 1024


class ServerState(enum.Enum):
    JOINING = "joining"
    ONLINE = "online"
    OFFLINE = "offline"


@dataclass(frozen=True)
class ServerInfo:
    """What a server tells the swarm about itself. Block range ``[start, end)``.

    ``inference_latency`` is the measured seconds per token per block for one inference step;
    ``throughput`` the tokens/s the server can serve through one block (the minimum of its inference,
    forward and network rates; ``forward_throughput`` and ``network_throughput`` are the latter two, 0 when
    unknown); ``free_cache_tokens`` how many
    more tokens (per block) its KV-cache budget can hold now; ``next_rtts`` pairs of (peer id, seconds)
    to servers hosting the blocks after its own. With batching on, ``throughput`` counts what batching the
    steps of concurrent sessions adds (the speed-up measured at start on 16 sessions).
    """

    state: ServerState
    start: int
    end: int
    public_name: str = ""
    throughput: float = 0.0
    inference_latency: float = 0.0
    free_cache_tokens: int = 0
    inference_max_length: int = 0
    max_batch_size: int = 0
    torch_dtype: str = "float32"
    quantization: str = "none"
    adapters: tuple[str, ...] = ()
    software_version: str = ""
    wire_version: int = WIRE_VERSION
    config_hash: str = ""
    relayed: bool = False
    next_rtts: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    forward_throughput: float = 0.0
    network_throughput: float = 0.0
    #: sessions per inference batch on average since the last announcement (0: idle, or batching off)
    batch_sessions: float = 0.0


@dataclass(frozen=True)
class RecordClaim:
    """What a record's writer signs: the record (``body``, a packed ``ServerInfo``, ``ModelRecord``, ...), where
    it is stored (so it cannot be moved to another key or subkey), whose it is (``owner``: a server's peer id,
    which must be the signer's; "" for records any member may write) and until when it holds."""

    kind: str
    dht_key: str
    dht_subkey: str
    owner: str
    expiration: float
    body: bytes


@dataclass(frozen=True)
class SignedRecord:
    """A packed :class:`RecordClaim`, the writer's public key (its peer id is derived from it) and its
    signature of ``claim``. This is the DHT value (sealed with the swarm key in a private swarm)."""

    claim: bytes
    public_key: bytes
    signature: bytes


#: The one well-known DHT key under which every server also names its model (subkey: the DHT prefix), so
#: that health views can list the swarm's models without being told them.
MODELS_KEY = "_corolla.models"
#: At most this many models are read from the directory (a bound on what a DHT peer can make us decode).
MAX_MODELS = 256


@dataclass(frozen=True)
class ModelRecord:
    """A model some server of the swarm hosts: where its blocks are announced and how many there are."""

    dht_prefix: str
    num_blocks: int
    config_hash: str
    model_type: str = ""
