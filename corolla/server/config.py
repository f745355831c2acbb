"""Server settings, grouped by concern; the CLI maps its flags onto these and nothing else parses them."""

from __future__ import annotations

from dataclasses import dataclass, field

from corolla.swarm.config import NetworkConfig


@dataclass(frozen=True)
class CacheConfig:
    #: KV-cache tokens per hosted block (Petals' ``--attn_cache_tokens``); the server-wide budget is this
    #: times the number of hosted blocks.
    attn_cache_tokens: int = 16384
    #: How long a session waits for cache space before failing with CacheFullError.
    max_alloc_timeout: float = 600.0


@dataclass(frozen=True)
class LimitsConfig:
    """What one client (peer id) may hold of this server at once; beyond it a request is refused at once,
    naming the limit (see ``corolla.server.client_limits``)."""

    #: Share of the KV-cache budget one client's sessions may hold or wait for (1.0: no share of its own).
    max_client_cache_share: float = 0.5
    #: Inference sessions one client may have open (or waiting for cache) here; 0 = no bound.
    max_client_sessions: int = 32
    #: Compute jobs (inference steps, forwards, backwards) one client may have waiting or running; 0 = no bound.
    max_client_jobs: int = 64
    #: Calls (streams) one client may have open here, from its first byte to its hang-up; 0 = no bound.
    max_client_calls: int = 128

    def __post_init__(self) -> None:
        if not 0 < self.max_client_cache_share <= 1:
            raise ValueError(f"max_client_cache_share must be in (0, 1], got {self.max_client_cache_share}")
        for name in ("max_client_sessions", "max_client_jobs", "max_client_calls"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = no bound), got {getattr(self, name)}")


@dataclass(frozen=True)
class ServerConfig:
    model: str
    network: NetworkConfig = field(default_factory=NetworkConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    #: Block choice: explicit [start, end) or a count to place automatically (one of the two, or neither:
    #: then all blocks).
    block_indices: tuple[int, int] | None = None
    num_blocks: int | None = None
    dht_prefix: str | None = None
    device: str = "cpu"
    torch_dtype: str = "auto"
    #: Weight-only quantization of the hosted blocks' linear layers: "none", "int8" or "nf4".
    quant_type: str = "none"
    revision: str | None = None
    token: str | None = None
    public_name: str = ""
    inference_max_length: int = 8192
    max_batch_size: int = 8192
    #: Continuous batching: run the waiting inference steps of concurrent sessions as one forward, at most
    #: ``max_batch_tokens`` tokens (rows x tokens) per forward; off = one step at a time, as before.
    batching: bool = True
    max_batch_tokens: int = 256
    #: Longest a forward or one inference step may wait and compute, in seconds.
    request_timeout: float = 180.0
    #: An inference session with no step for this long is closed and its cache freed.
    session_timeout: float = 300.0
    #: Largest message accepted or sent.
    max_message_bytes: int = 64 * 1024 * 1024
    #: Seconds between DHT announcements; records expire after ``expiration`` seconds.
    update_period: float = 30.0
    expiration: float | None = None
    num_threads: int | None = None
    #: "auto" (cached measurement, else measure), "eval" (measure anew) or tokens/s per block.
    throughput: str = "auto"
    #: Rebalancing: check every ``balance_period`` seconds (jittered; 0 = never) and move when the swarm's
    #: bottleneck now is below ``balance_quality`` x the bottleneck after the move. A decision is confirmed
    #: after a random pause of up to ``balance_confirm`` seconds.
    balance_period: float = 120.0
    balance_quality: float = 0.75
    balance_confirm: float = 5.0
    #: PEFT LoRA adapters to serve (``REF`` or ``NAME=REF``; REF a local folder or Hub repo id).
    adapters: tuple[str, ...] = ()
    #: Most bytes of LoRA weights one client may upload for training (0 = accept none), and how long an
    #: unused upload is kept.
    max_client_adapter_bytes: int = 256 * 2**20
    client_adapter_ttl: float = 600.0

    def __post_init__(self) -> None:
        if self.block_indices is not None and self.num_blocks is not None:
            raise ValueError("give either block_indices or num_blocks, not both")
        if self.block_indices is not None and not 0 <= self.block_indices[0] < self.block_indices[1]:
            raise ValueError(f"block_indices must be START:END with 0 <= START < END, got {self.block_indices}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        for name in ("inference_max_length", "max_batch_size", "max_message_bytes", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.balance_quality <= 1:
            raise ValueError(f"balance_quality must be in (0, 1], got {self.balance_quality}")
        if self.balance_period < 0 or self.balance_confirm < 0:
            raise ValueError("balance_period and balance_confirm must be >= 0")
        if self.max_client_adapter_bytes < 0 or self.client_adapter_ttl <= 0:
            raise ValueError("max_client_adapter_bytes must be >= 0 and client_adapter_ttl > 0")
        if self.quant_type not in ("none", "int8", "nf4"):
            raise ValueError(f"quant_type must be none, int8 or nf4, got {self.quant_type!r}")
        if self.cache.attn_cache_tokens < 0:
            raise ValueError(f"attn_cache_tokens must be >= 0, got {self.cache.attn_cache_tokens}")

    @property
    def record_expiration(self) -> float:
        return self.expiration if self.expiration is not None else 2.5 * self.update_period
