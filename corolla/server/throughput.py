"""How fast this server is: compute tokens/s per block (inference and forward) and network tokens/s.

Compute is measured on one randomly initialised block of the model's geometry, in the server's dtype
and on its device, so it needs no weights and can run before blocks are chosen. The result is cached
on disk (``$COROLLA_CACHE_DIR`` or ``~/.cache/corolla``, one JSON file) under a key of device, dtype,
model config hash, torch version and thread count, so restarts skip it; ``--throughput eval`` forces a
new measurement and a number skips it altogether.

The network is measured against other servers of the swarm (never anything outside it): a probe
message of ``PROBE_BYTES`` goes to up to three online servers; the best rate seen, turned into tokens/s
with the bytes one token's hidden state costs in and out, is the network throughput. A server with
nobody to measure against reports no network limit and says so.

The announced ``throughput`` is the minimum of inference, forward and network tokens/s: the rate this
server can sustain for one block whatever the traffic is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

import torch

from corolla.paths import cache_dir
from corolla.swarm.transport import Transport
from corolla.wire.messages import PingRequest, PingResponse, ProbeRequest, ProbeResponse

logger = logging.getLogger(__name__)

PROBE_BYTES = 4 * 1024 * 1024
_CACHE_FILE = "throughput_v1.json"


@dataclass(frozen=True)
class ComputeThroughput:
    """Tokens per second through one block."""

    inference: float  # batch 1, one token per step, with a KV cache
    forward: float  # a batch forward without cache (fine-tuning, prompt scoring)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{os.cpu_count()}cpu"


def cache_key(device, dtype: torch.dtype, config_hash: str) -> str:
    return "|".join(
        [device_name(device), str(dtype).removeprefix("torch."), config_hash[:16],
         f"torch{torch.__version__}", f"threads{torch.get_num_threads()}"]
    )  # fmt: skip


def load_cached(key: str) -> ComputeThroughput | None:
    path = cache_dir() / _CACHE_FILE
    try:
        entry = json.loads(path.read_text())[key]
        return ComputeThroughput(float(entry["inference"]), float(entry["forward"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_cached(key: str, value: ComputeThroughput) -> None:
    path = cache_dir() / _CACHE_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[key] = asdict(value)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as e:
        logger.warning("Could not cache the throughput measurement in %s: %s", path, e)


def measure_compute(
    config, *, dtype: torch.dtype, device="cpu", forward_tokens: int = 256, inference_steps: int = 16
) -> ComputeThroughput:
    """Time one random block: one-token inference steps with a cache, and a ``forward_tokens`` batch forward.

    Each figure is the best of its runs (servers often start together; contention would otherwise make a
    server announce itself slower than it is).
    """
    from corolla.models.stack import BlockStack

    stack = BlockStack.from_config(config, 0, 1, dtype=dtype, device=device)
    for p in stack.parameters():
        torch.nn.init.normal_(p, std=0.02)
    hidden_size = config.hidden_size
    with torch.inference_mode():
        caches = stack.allocate_cache(1, inference_steps + 1)
        mask = torch.ones(1, inference_steps + 1, dtype=torch.bool, device=device)
        x = torch.randn(1, 1, hidden_size, dtype=dtype, device=device)
        times = []
        for i in range(inference_steps):
            t0 = time.perf_counter()
            stack(x, torch.tensor([[i]], device=device), mask[:, : i + 1], caches, offset=i)
            _sync(device)
            times.append(time.perf_counter() - t0)
        inference = 1.0 / min(times[1:])
        length = forward_tokens
        xs = torch.randn(1, length, hidden_size, dtype=dtype, device=device)
        positions = torch.arange(length, device=device)[None]
        full = torch.ones(1, length, dtype=torch.bool, device=device)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            stack(xs, positions, full)
            _sync(device)
            times.append(time.perf_counter() - t0)
        forward = length / min(times)
    return ComputeThroughput(inference=inference, forward=forward)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def compute_throughput(
    setting: str, config, config_hash: str, *, dtype: torch.dtype, device="cpu"
) -> ComputeThroughput:
    """Resolve ``--throughput``: "auto" (cached or measured), "eval" (measured anew) or a number (tokens/s)."""
    if setting not in ("auto", "eval"):
        try:
            value = float(setting)
        except ValueError:
            raise ValueError(f"--throughput must be auto, eval or a number of tokens/s, got {setting!r}") from None
        if value <= 0:
            raise ValueError(f"--throughput must be positive, got {value}")
        logger.info("Throughput set by --throughput: %.1f tokens/s per block", value)
        return ComputeThroughput(inference=value, forward=value)
    key = cache_key(device, dtype, config_hash)
    if setting == "auto":
        cached = load_cached(key)
        if cached is not None:
            logger.info(
                "Throughput from the cache in %s: inference %.1f, forward %.1f tokens/s per block "
                "(--throughput eval measures anew)",
                cache_dir(), cached.inference, cached.forward,
            )  # fmt: skip
            return cached
    logger.info("Measuring compute throughput on one random block (%s, %s)", device, dtype)
    value = measure_compute(config, dtype=dtype, device=device)
    logger.info(
        "Measured inference %.1f and forward %.1f tokens/s per block; cached in %s",
        value.inference, value.forward, cache_dir(),
    )  # fmt: skip
    store_cached(key, value)
    return value


async def probe_bandwidth(transport: Transport, peers: list[str], timeout: float = 10.0) -> float:
    """The best bytes/s seen sending a ``PROBE_BYTES`` probe to each of ``peers`` (0.0 if none answered)."""
    payload = bytes(PROBE_BYTES)
    best = 0.0
    for peer in peers:
        t0 = time.perf_counter()
        try:
            await transport.call(peer, ProbeRequest(payload), ProbeResponse, timeout)
        except Exception as e:
            logger.debug("Bandwidth probe to %s failed: %r", peer, e)
            continue
        best = max(best, PROBE_BYTES / (time.perf_counter() - t0))
    return best


async def measure_rtts(
    transport: Transport, peers: list[str], timeout: float = 2.0
) -> tuple[tuple[str, float], ...]:
    """(peer, seconds) of a ping to each of ``peers`` that answered in time."""

    async def rtt(peer: str) -> tuple[str, float] | None:
        t0 = time.perf_counter()
        try:
            await transport.call(peer, PingRequest(), PingResponse, timeout)
        except Exception:
            return None
        return peer, round(time.perf_counter() - t0, 6)

    return tuple(r for r in await asyncio.gather(*(rtt(p) for p in peers)) if r is not None)


def network_tokens_per_second(bytes_per_second: float, hidden_size: int, dtype: torch.dtype) -> float:
    """Tokens/s a link of ``bytes_per_second`` carries: each token's hidden state goes in and comes out."""
    per_token = 2 * hidden_size * torch.empty((), dtype=dtype).element_size()
    return bytes_per_second / per_token


def announced_throughput(compute: ComputeThroughput, network: float | None) -> float:
    rates = [compute.inference, compute.forward] + ([network] if network else [])
    return min(rates)
