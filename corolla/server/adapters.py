"""Adapters on a server: PEFT LoRA adapters it serves (``--adapters``) and clients' own LoRA weights.

Served adapters are loaded once at start, for this server's blocks only, from a local folder or a Hub
repo holding ``adapter_config.json`` + ``adapter_model.safetensors`` (pickled ``adapter_model.bin`` is
refused: nothing pickled is ever loaded), checked against the model by :mod:`corolla.models.lora`, and
announced in ``ServerInfo.adapters``. A request names one (``adapter`` of ``ForwardRequest``,
``InferenceOpen``, training requests); base weights are never merged, so every request may pick another.

Client adapters are LoRA weights a client trains itself: it uploads the slices for this server's blocks
(:class:`~corolla.wire.messages.LoraUploadRequest`, once per weights version, not per request), then
names them in its forward and backward requests; backward returns their gradients. Decisions:

- **Owned by one peer.** An upload is stored under (peer id, name); only that peer can use or release it.
  Peer ids are authenticated by libp2p, so another client cannot read or use it.
- **Never kept past its use.** The client releases old versions as it uploads new ones and everything at
  the end of training; anything not used for ``client_ttl`` seconds is dropped (a client that died). An
  expired or missing adapter is answered with ``UnknownAdapterError`` and the client uploads it again.
- **Bounded.** One peer's uploads may hold at most ``max_client_bytes`` (in this server's dtype); an
  upload over it fails with :class:`AdapterLimitError` saying how much is in use, and nothing of it is
  kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from corolla.models.lora import (
    FusedAdapter,
    LoraAdapter,
    LoraError,
    attach_lora,
    fuse_adapter,
    fuse_weights,
    lora_sites,
    parse_peft_adapter,
    use_adapter,
)
from corolla.models.stack import BlockStack
from corolla.wire.errors import AdapterLimitError, BadRequestError, UnknownAdapterError
from corolla.wire.messages import (
    BackwardRequest,
    BackwardResponse,
    LoraTensors,
    LoraUploadRequest,
    TrainForwardRequest,
)

if TYPE_CHECKING:
    from corolla.server.backward import TrainingBackend

logger = logging.getLogger(__name__)

MAX_NAME_LENGTH = 200
#: Distinct adapters one client may hold on a server at once (besides the byte bound).
MAX_ADAPTERS_PER_CLIENT = 16

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_FILE = "adapter_model.bin"


class AdapterLoadError(ValueError):
    """A ``--adapters`` entry cannot be loaded or does not fit the model."""


def parse_adapter_spec(spec: str) -> tuple[str, str]:
    """``NAME=REF`` or ``REF`` (then the name is REF, as clients of Petals name adapters by repo id)."""
    name, sep, ref = spec.partition("=")
    if sep and name and ref and not Path(spec).exists():
        return name, ref
    return spec, spec


def read_adapter_files(ref: str, *, revision: str | None = None, token: str | None = None) -> tuple[dict, dict]:
    """(adapter_config dict, tensors) of a local folder or a Hub repo; safetensors only."""
    folder = Path(ref)
    if folder.is_dir():
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not config_path.is_file():
            raise AdapterLoadError(f"{ref}: no {CONFIG_FILE} (is it a PEFT adapter folder?)")
        if not weights_path.is_file():
            if (folder / PICKLED_FILE).exists():
                raise AdapterLoadError(
                    f"{ref}: only {PICKLED_FILE} (a pickle) is there; corolla loads adapters from {WEIGHTS_FILE} "
                    "only. Re-save it with save_pretrained(..., safe_serialization=True)"
                )
            raise AdapterLoadError(f"{ref}: no {WEIGHTS_FILE}")
    else:
        config_path, weights_path = _download(ref, revision, token)
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterLoadError(f"{ref}: unreadable {CONFIG_FILE}: {e}") from None
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{ref}: {CONFIG_FILE} is not a JSON object")
    return config, load_file(str(weights_path))


def _download(repo: str, revision: str | None, token: str | None) -> tuple[Path, Path]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    try:
        config = hf_hub_download(repo, CONFIG_FILE, revision=revision, token=token)
    except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise AdapterLoadError(
            f"adapter {repo!r} is neither a local folder nor a readable Hub repo: {e}"
        ) from None
    try:
        weights = hf_hub_download(repo, WEIGHTS_FILE, revision=revision, token=token)
    except EntryNotFoundError:
        raise AdapterLoadError(
            f"Hub repo {repo!r} has no {WEIGHTS_FILE}; corolla does not load pickled {PICKLED_FILE}"
        ) from None
    return Path(config), Path(weights)


def check_served_adapters(specs, model_config, *, token=None) -> None:
    """Read and check every ``--adapters`` entry against the model (all blocks), keeping nothing."""
    from corolla.models.registry import get_family

    family = get_family(model_config.model_type)
    for spec in specs:
        name, ref = parse_adapter_spec(spec)
        config, tensors = read_adapter_files(ref, token=token)
        try:
            parse_peft_adapter(config, tensors, family, model_config, blocks=(0, 0))
        except LoraError as e:
            raise AdapterLoadError(f"adapter {ref!r} does not fit this model: {e}") from None
        logger.info("Adapter %r (%s) fits the model", name, ref)


def load_served_adapter(ref: str, stack: BlockStack, *, revision=None, token=None) -> LoraAdapter:
    """A served adapter restricted to ``stack``'s blocks, in its dtype, checked against its model."""
    config, tensors = read_adapter_files(ref, revision=revision, token=token)
    try:
        adapter = parse_peft_adapter(
            config, tensors, stack.family, stack.config, blocks=(stack.start, stack.end), dtype=stack.dtype
        )
    except LoraError as e:
        raise AdapterLoadError(f"adapter {ref!r} does not fit this model: {e}") from None
    adapter.weights = {i: {n: (a.to(stack.device), b.to(stack.device)) for n, (a, b) in w.items()}
                       for i, w in adapter.weights.items()}  # fmt: skip
    return adapter


@dataclass
class ClientAdapter:
    """One peer's uploaded LoRA weights for some of this server's blocks."""

    scale: float
    weights: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    last_used: float = 0.0
    fused: FusedAdapter | None = None  # built on first forward use, dropped on upload

    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for pairs in self.weights.values() for a, b in pairs.values())


class AdapterStore:
    """The served adapters and the clients' uploads of one server."""

    def __init__(
        self,
        stack: BlockStack,
        served: dict[str, LoraAdapter] | None = None,
        *,
        max_client_bytes: int = 0,
        client_ttl: float = 600.0,
        clock=time.monotonic,
    ):
        self.stack = stack
        self.served = {name: fuse_adapter(ad, stack.family, stack.config) for name, ad in (served or {}).items()}
        self.max_client_bytes, self.client_ttl, self.clock = max_client_bytes, client_ttl, clock
        self.sites = {
            i: lora_sites(stack.family, stack.specs[i - stack.start]) for i in range(stack.start, stack.end)
        }
        self._clients: dict[tuple[str, str], ClientAdapter] = {}
        self._timer = None
        # the blocks get their LoRA wrappers with the first adapter (a server without any keeps plain blocks)
        self._wrapped = False
        if self.served:
            self._wrap()

    def _wrap(self) -> None:
        """Wrap the blocks' linears for LoRA. Safe while a forward runs: a wrapper with no adapter is identity."""
        if not self._wrapped:
            attach_lora(self.stack)
            self._wrapped = True

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.served))

    def client_bytes(self, peer: str) -> int:
        return sum(entry.nbytes() for (p, _), entry in self._clients.items() if p == peer)

    def expire(self) -> None:
        now = self.clock()
        for key in [k for k, e in self._clients.items() if now - e.last_used > self.client_ttl]:
            logger.info("Dropped adapter %r of %s: unused for over %.0f s", key[1], key[0], self.client_ttl)
            del self._clients[key]

    def _schedule_expiry(self) -> None:
        """Check again when the oldest upload may expire, so that a gone client's uploads are dropped on time
        even if no request comes (only on an event loop; unit tests call ``expire`` themselves)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._timer is not None or not self._clients:
            return
        oldest = min(entry.last_used for entry in self._clients.values())
        delay = max(0.0, oldest + self.client_ttl - self.clock()) + 1.0

        def check() -> None:
            self._timer = None
            self.expire()
            self._schedule_expiry()

        self._timer = loop.call_later(delay, check)

    # --- choosing an adapter for a request -----------------------------------------------------------

    def resolve(self, peer: str, name: str, start: int, end: int) -> FusedAdapter | None:
        """The side path for a request over blocks [start, end): none, a served adapter, or the peer's own."""
        if not name:
            return None
        entry = self._client_entry(peer, name, start, end)
        if entry is not None:
            if entry.fused is None:
                entry.fused = fuse_weights(entry.weights, entry.scale, self.stack.family, self.stack.config)
            return entry.fused
        if name in self.served:
            return self.served[name]
        served = ", ".join(repr(n) for n in self.names) or "none"
        raise UnknownAdapterError(f"adapter {name!r} is not served here (this server serves: {served})")

    def client_weights(self, peer: str, name: str, start: int, end: int) -> ClientAdapter | None:
        """The peer's uploaded adapter ``name`` covering [start, end), or None if ``name`` is not one."""
        return self._client_entry(peer, name, start, end)

    def _client_entry(self, peer: str, name: str, start: int, end: int) -> ClientAdapter | None:
        self.expire()
        entry = self._clients.get((peer, name))
        if entry is None:
            return None
        missing = [i for i in range(start, end) if i not in entry.weights]
        if missing:
            raise UnknownAdapterError(f"adapter {name!r} has no uploaded weights for blocks {missing}")
        entry.last_used = self.clock()
        return entry

    # --- client uploads ------------------------------------------------------------------------------

    def upload(self, peer: str, request: LoraUploadRequest) -> int:
        """Store (or add to) the peer's adapter; returns the bytes the peer now holds here."""
        if self.max_client_bytes <= 0:
            raise AdapterLimitError("this server does not accept client adapters (--max_client_adapter_bytes 0)")
        if not 0 < len(request.name) <= MAX_NAME_LENGTH:
            raise BadRequestError(f"a client adapter needs a name of 1 to {MAX_NAME_LENGTH} characters")
        if request.name in self.served:
            raise BadRequestError(f"{request.name!r} is the name of an adapter this server serves")
        if not (math.isfinite(request.scale)):
            raise BadRequestError(f"LoRA scale must be finite, got {request.scale}")
        self.expire()
        if request.replaces:
            self.release(peer, request.replaces)
        weights = self._check_upload(request)
        key = (peer, request.name)
        entry = self._clients.get(key)
        kept = entry.weights if entry is not None and entry.scale == request.scale else {}
        if entry is None and sum(p == peer for p, _ in self._clients) >= MAX_ADAPTERS_PER_CLIENT:
            raise AdapterLimitError(
                f"this client already holds {MAX_ADAPTERS_PER_CLIENT} adapters here; release one first"
            )
        merged = ClientAdapter(request.scale, {**kept, **weights}, last_used=self.clock())
        others = self.client_bytes(peer) - (entry.nbytes() if entry is not None else 0)
        if others + merged.nbytes() > self.max_client_bytes:
            raise AdapterLimitError(
                f"adapter {request.name!r} would bring this client's adapters here to "
                f"{others + merged.nbytes()} bytes, over the limit of {self.max_client_bytes} bytes "
                f"(--max_client_adapter_bytes); {self.client_bytes(peer)} bytes are in use"
            )
        self._wrap()
        self._clients[key] = merged
        self._schedule_expiry()
        return self.client_bytes(peer)

    def release(self, peer: str, name: str) -> bool:
        """Drop the peer's adapter ``name`` ("" = all of the peer's); whether anything was dropped."""
        if not name:
            keys = [k for k in self._clients if k[0] == peer]
            for key in keys:
                del self._clients[key]
            return bool(keys)
        return self._clients.pop((peer, name), None) is not None

    def _check_upload(self, request: LoraUploadRequest) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        stack = self.stack
        if not stack.start <= request.start < request.end <= stack.end:
            raise BadRequestError(
                f"adapter blocks [{request.start}, {request.end}) are not within this server's blocks "
                f"[{stack.start}, {stack.end})"
            )
        weights: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {
            i: {} for i in range(request.start, request.end)
        }
        for item in request.weights:
            if not request.start <= item.block < request.end:
                raise BadRequestError(
                    f"LoRA weights for block {item.block} outside [{request.start}, {request.end})"
                )
            site = self.sites[item.block].get(item.target)
            if site is None:
                raise BadRequestError(
                    f"block {item.block} has no linear layer {item.target!r}; "
                    f"known: {', '.join(sorted(self.sites[item.block]))}"
                )
            _check_pair(item, site.in_features, site.out_features)
            if item.target in weights[item.block]:
                raise BadRequestError(f"LoRA weights for block {item.block} {item.target} sent twice")
            weights[item.block][item.target] = (
                item.a.to(stack.device, stack.dtype).contiguous(),
                item.b.to(stack.device, stack.dtype).contiguous(),
            )
        empty = [i for i, pairs in weights.items() if not pairs]
        if empty:
            raise BadRequestError(
                f"the upload for blocks [{request.start}, {request.end}) has no weights for {empty}"
            )
        return weights


def _check_pair(item: LoraTensors, in_features: int, out_features: int) -> None:
    a, b = item.a, item.b
    r = a.shape[0] if a.ndim == 2 else -1
    if (
        not (a.is_floating_point() and b.is_floating_point())
        or a.ndim != 2
        or b.ndim != 2
        or not 1 <= r <= in_features
        or tuple(a.shape) != (r, in_features)
        or tuple(b.shape) != (out_features, r)
    ):
        raise BadRequestError(
            f"LoRA weights of block {item.block} {item.target} must be floating A [r, {in_features}] and "
            f"B [{out_features}, r], got {a.dtype} {list(a.shape)} and {b.dtype} {list(b.shape)}"
        )


def _client_extras(training: TrainingBackend, adapter: ClientAdapter, start: int, end: int):
    """The client's LoRA pairs for blocks [start, end) as trainable extras, and the context that applies them."""
    keys = [(block, target) for block in range(start, end) for target in adapter.weights[block]]
    extra = [t for block, target in keys for t in adapter.weights[block][target]]
    stack = training.backend.stack

    def active(leaves):
        weights: dict[int, dict[str, tuple]] = {}
        for i, (block, target) in enumerate(keys):
            weights.setdefault(block, {})[target] = (leaves[2 * i], leaves[2 * i + 1])
        return use_adapter(fuse_weights(weights, adapter.scale, stack.family, stack.config))

    return keys, extra, active


async def lora_forward(training: TrainingBackend, adapter: ClientAdapter, request: TrainForwardRequest, peer: str):
    """A training forward with the client's own LoRA whose graph (over the LoRA pairs too) is kept for the backward."""
    _, extra, active = _client_extras(training, adapter, request.start, request.end)
    return await training.forward(request, peer, extra, active)


async def lora_backward(
    training: TrainingBackend, adapter: ClientAdapter, request: BackwardRequest, peer: str = ""
):
    """Backward over the span with the client's own LoRA pairs as trainable extras: their gradients too.

    Uses the graph its forward kept (:func:`lora_forward`) when the client names it, else recomputes."""
    keys, extra, active = _client_extras(training, adapter, request.start, request.end)
    grad_hidden, grad_prompts, grads = await training.backward_grads(request, peer, extra, active)
    pairs = tuple(LoraTensors(b, t, grads[2 * i], grads[2 * i + 1]) for i, (b, t) in enumerate(keys))
    return BackwardResponse(grad_hidden, grad_prompts, pairs)
