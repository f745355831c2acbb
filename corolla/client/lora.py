"""The client's own LoRA: A and B for every block, held and trained by the client.

(Choosing a *served* adapter per request is :mod:`corolla.client.active_adapter`.)

:class:`RemoteLora` holds the weights; the model's chain is wrapped in a :class:`LoraChain`, a chain that
passes every forward and session to the chain below with :class:`LoraExtras`, the
:class:`~corolla.client.chain.ChainExtras` of a LoRA: on the swarm each request names the client's adapter,
each server gets the weights before its first request, and each backward returns A/B gradients (the
chunked, routed, retried path of :mod:`corolla.client.remote_autograd`); in process the stack applies them
under ordinary autograd. Decisions:

- **Weights travel once per version.** A version is the state of the weights: a new version name
  whenever a parameter's version counter moved (an optimizer step, any in-place change). A server gets a
  span's slices before its first request under a version (one upload per server and step, replacing the
  previous version, split to fit messages); every chunk's forward and backward only names it.
- **Lost uploads are re-sent**, not treated as a failed server: a server that answers ``unknown_adapter``
  (restarted, TTL passed) gets the slices again (``LoraExtras.recover``); other errors follow the client's
  failure policy.
- **Same math locally.** On an in-process chain the blocks run with the same fused side path
  (``corolla.models.lora``) under ordinary autograd: the reference for tests and ``bench/finetune.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from corolla.client.chain import NO_EXTRAS, ChainExtras, ChainSession, RemoteChain
from corolla.client.remote_autograd import call_peer
from corolla.models.lora import (
    LoraAdapter,
    fuse_weights,
    lora_scale,
    lora_sites,
    parse_peft_adapter,
    target_short_names,
    use_adapter,
)
from corolla.models.lora import attach_lora as attach_lora_wrappers
from corolla.models.registry import get_family
from corolla.wire.errors import UnknownAdapterError
from corolla.wire.messages import (
    BackwardRequest,
    BackwardResponse,
    LoraReleaseRequest,
    LoraReleaseResponse,
    LoraTensors,
    LoraUploadRequest,
    LoraUploadResponse,
)

logger = logging.getLogger(__name__)

# --- client-owned LoRA ------------------------------------------------------------------------------------


class RemoteLora(nn.Module):
    """LoRA weights for every block of a distributed model, held and trained by the client.

    ``RemoteLora.attach(model, r=8, lora_alpha=16, target_modules=[...])`` (or ``config=`` a
    ``peft.LoraConfig``) creates them like PEFT does (A Kaiming-uniform, B zero) and makes ``model``
    run its blocks with them; ``RemoteLora.attach(model, path=ADAPTER)`` starts from a saved PEFT
    adapter. The model's own parameters are frozen: ``lora.parameters()`` are what an optimizer trains.
    ``save_pretrained(path)`` writes a PEFT adapter (``adapter_config.json`` + safetensors) that
    ``peft.PeftModel.from_pretrained`` loads and ``corolla server --adapters`` serves. ``release()``
    tells servers to drop the uploaded copies (they drop them after their TTL anyway).

    How the weights reach servers: each forward call through the swarm checks whether the weights
    changed since the last upload (the parameters' version counters: an optimizer step bumps them) and,
    if so, names a new version. Before a span's first request to a server under a version, the
    server's blocks get that version's slices (one upload, replacing the previous version); every
    forward and backward request of the step's chunks then only names it.
    """

    def __init__(self, model_config, *, r: int, lora_alpha: float, target_modules, use_rslora: bool = False):
        super().__init__()
        self.family = get_family(model_config.model_type)
        self.model_config = model_config
        self.r, self.alpha, self.use_rslora = int(r), float(lora_alpha), bool(use_rslora)
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules or ())
        known = target_short_names(self.family, self.family.block_spec(model_config, 0))
        unknown = sorted(set(targets) - set(known))
        if not targets or unknown:
            raise ValueError(f"target_modules must be a non-empty subset of {known}, got {targets}")
        self.target_modules = tuple(sorted(targets))
        self.params = nn.ParameterDict()
        self.keys: list[tuple[int, str]] = []  # (block, HF module path), in a fixed order
        for block in range(model_config.num_hidden_layers):
            for name, site in lora_sites(self.family, self.family.block_spec(model_config, block)).items():
                if site.short_name not in self.target_modules:
                    continue
                a = torch.empty(self.r, site.in_features)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default init: the delta starts at zero
                self.params[_param_name(block, name, "A")] = nn.Parameter(a)
                self.params[_param_name(block, name, "B")] = nn.Parameter(torch.zeros(site.out_features, self.r))
                self.keys.append((block, name))
        self.run_id = uuid.uuid4().hex[:12]
        self._version, self._fingerprint = 0, None
        self._uploaded: dict[str, tuple[str, set[int]]] = {}  # peer -> (adapter name, blocks it holds)
        self._locks: dict[str, asyncio.Lock] = {}
        self._manager = None  # the swarm chain that has our uploads, once one has

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, self.use_rslora)

    def pair(self, block: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.params[_param_name(block, name, "A")], self.params[_param_name(block, name, "B")]

    def weights(self, start: int = 0, end: int | None = None) -> dict[int, dict[str, tuple]]:
        end = self.model_config.num_hidden_layers if end is None else end
        out: dict[int, dict[str, tuple]] = {}
        for block, name in self.keys:
            if start <= block < end:
                out.setdefault(block, {})[name] = self.pair(block, name)
        return out

    # --- attaching, saving, loading ---------------------------------------------------------------------

    @classmethod
    def attach(cls, model, config=None, *, path: str | None = None, **options) -> RemoteLora:
        """New (or, with ``path``, saved PEFT) LoRA weights for ``model``'s blocks; ``model`` now uses them."""
        if path is not None:
            lora = cls.from_pretrained(model.config, path)
        else:
            if config is not None:  # a peft.LoraConfig, or anything with its fields
                options = dict(r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules,
                               use_rslora=getattr(config, "use_rslora", False), **options)  # fmt: skip
            lora = cls(model.config, **options)
        layers = model.model.layers
        if isinstance(layers.chain, LoraChain):
            raise ValueError("this model already has a LoRA attached (model.lora)")
        model.requires_grad_(False)
        lora.to(dtype=model.dtype)
        model.lora = lora  # a submodule: its parameters are the model's trainable ones
        model.model.layers = type(layers)(LoraChain(layers.chain, lora))
        return lora

    @classmethod
    def from_pretrained(cls, model_config, path: str | Path) -> RemoteLora:
        """Weights and settings of a saved PEFT LoRA adapter (a local folder)."""
        folder = Path(path)
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        family = get_family(model_config.model_type)
        adapter = parse_peft_adapter(config, tensors, family, model_config)
        targets = {name.rsplit(".", 1)[-1] for pairs in adapter.weights.values() for name in pairs}
        lora = cls(model_config, r=adapter.r, lora_alpha=adapter.alpha, target_modules=sorted(targets),
                   use_rslora=adapter.use_rslora)  # fmt: skip
        with torch.no_grad():
            for block, name in lora.keys:
                if name not in adapter.weights.get(block, {}):
                    raise ValueError(f"{path}: no LoRA weights for {family.prefix(block)}{name}")
                a, b = lora.pair(block, name)
                a.copy_(adapter.weights[block][name][0])
                b.copy_(adapter.weights[block][name][1])
        return lora

    def to_adapter(self) -> LoraAdapter:
        weights = {b: {n: (a.detach().float().cpu(), bb.detach().float().cpu()) for n, (a, bb) in pairs.items()}
                   for b, pairs in self.weights().items()}  # fmt: skip
        return LoraAdapter(self.r, self.alpha, self.target_modules, self.use_rslora, weights)

    def save_pretrained(self, path: str | Path, base_model: str = "") -> Path:
        """Write a PEFT adapter folder: adapter_config.json + adapter_model.safetensors (float32)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        adapter = self.to_adapter()
        base_model = base_model or getattr(self.model_config, "_name_or_path", "") or ""
        (folder / "adapter_config.json").write_text(json.dumps(adapter.peft_config(base_model), indent=2))
        save_file(adapter.peft_tensors(self.family), str(folder / "adapter_model.safetensors"))
        return folder

    # --- versions and uploads ---------------------------------------------------------------------------

    def current_name(self) -> str:
        """The adapter name of the weights as they are now (a new one after every change)."""
        fingerprint = tuple(p._version for p in self.params.values())
        if fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            self._version += 1
        return f"lora-{self.run_id}.v{self._version}"

    async def ensure_uploaded(self, manager, peer: str, start: int, end: int, name: str) -> None:
        """Upload version ``name``'s slices for blocks [start, end) to ``peer`` unless it already has them."""
        self._manager = manager
        lock = self._locks.setdefault(peer, asyncio.Lock())
        async with lock:
            held_name, held = self._uploaded.get(peer, ("", set()))
            blocks = set(range(start, end))
            if held_name == name and blocks <= held:
                return
            replaces = held_name if held_name and held_name != name else ""
            held = held if held_name == name else set()
            todo = sorted(blocks - held)
            for first, last in _upload_groups(self, todo, manager.config.max_message_bytes // 2):
                items = tuple(
                    LoraTensors(block, tname, a.detach().cpu(), b.detach().cpu())
                    for block, pairs in self.weights(first, last).items()
                    for tname, (a, b) in sorted(pairs.items())
                )
                request = LoraUploadRequest(manager.model, name, first, last, self.scale, items, replaces)
                await call_peer(manager, peer, request, LoraUploadResponse)
                replaces = ""
                held = held | set(range(first, last))
                self._uploaded[peer] = (name, held)

    def forget(self, peer: str) -> None:
        """The peer lost our adapter (expired, restarted): upload again next time."""
        self._uploaded.pop(peer, None)

    def release(self) -> None:
        """Ask every server holding an upload of ours to drop it now (best effort)."""
        manager, peers = self._manager, list(self._uploaded)
        self._uploaded.clear()
        if manager is None or not peers:
            return

        async def release_all():
            request = LoraReleaseRequest(manager.model, "")
            await asyncio.gather(*(call_peer(manager, p, request, LoraReleaseResponse) for p in peers),
                                 return_exceptions=True)  # fmt: skip

        manager.bridge.run(release_all(), timeout=30)


def _param_name(block: int, name: str, part: str) -> str:
    return f"{block}__{name.replace('.', '__')}__{part}"


def _upload_groups(lora: RemoteLora, blocks: list[int], max_bytes: int) -> list[tuple[int, int]]:
    """Consecutive runs of ``blocks`` whose LoRA weights fit ``max_bytes`` per upload (at least one block)."""
    sizes = {b: sum(a.nbytes + bb.nbytes for a, bb in pairs.values()) for b, pairs in lora.weights().items()}
    groups: list[tuple[int, int]] = []
    for block in blocks:
        if (
            groups
            and groups[-1][1] == block
            and sum(sizes.get(i, 0) for i in range(*groups[-1])) + sizes.get(block, 0) <= max_bytes
        ):
            groups[-1] = (groups[-1][0], block + 1)
        else:
            groups.append((block, block + 1))
    return groups


class LoraChain(RemoteChain):
    """A chain whose blocks run with a :class:`RemoteLora`: every call below carries its :class:`LoraExtras`.

    Deliberately not a transparent proxy: code that drives the chain below directly (requests without the
    adapter) must not mistake this chain for it and bypass the LoRA.
    """

    def __init__(self, chain: RemoteChain, lora: RemoteLora):
        self.chain, self.lora = chain, lora
        self.num_blocks = chain.num_blocks

    def forward(self, hidden, positions, attention_mask, start: int = 0, end: int | None = None, *,
                prompts=None, extras: ChainExtras = NO_EXTRAS) -> torch.Tensor:  # fmt: skip
        self._refuse_other(extras)
        extras = LoraExtras(self.lora, self.lora.current_name())
        return self.chain.forward(hidden, positions, attention_mask, start, end, prompts=prompts, extras=extras)

    def open_session(
        self, max_length: int, *, adapter=None, prompts=None, extras: ChainExtras = NO_EXTRAS, blocks=None
    ) -> ChainSession:
        self._refuse_other(extras)
        if adapter:
            raise ValueError(f"a model with a client LoRA attached cannot also use served adapter {adapter!r}")
        extras = LoraExtras(self.lora, self.lora.current_name())
        return self.chain.open_session(max_length, prompts=prompts, extras=extras, blocks=blocks)

    @staticmethod
    def _refuse_other(extras) -> None:
        if extras is not NO_EXTRAS:
            raise ValueError("a chain with a client LoRA takes no other trainable extras")

    def show_route(self) -> str:
        return self.chain.show_route()

    def shutdown(self) -> None:
        """Release the uploads on the servers (best effort), then leave the swarm."""
        try:
            self.lora.release()
        except Exception as e:  # servers gone or slow: their TTL drops the uploads
            logger.debug("Releasing the LoRA uploads failed: %r", e)
        self.chain.shutdown()


class LoraExtras(ChainExtras):
    """One version (``name``) of a client's LoRA riding with a chain's calls."""

    def __init__(self, lora: RemoteLora, name: str):
        self.lora, self.adapter = lora, name

    def parameters(self, start: int, end: int) -> list[torch.Tensor]:
        return [t for block, name in self.lora.keys if start <= block < end for t in self.lora.pair(block, name)]

    # --- on the swarm

    async def before_call(self, manager, peer: str, start: int, end: int) -> None:
        """The server gets this version's slices before its first request (sessions and training)."""
        await self.lora.ensure_uploaded(manager, peer, start, end, self.adapter)

    def recover(self, peer: str, error: BaseException) -> bool:
        """A server that lost our upload (expired, restarted) gets it again, without a ban."""
        self.lora.forget(peer)
        return isinstance(error, UnknownAdapterError)

    def span_grads(self, response: BackwardResponse, request: BackwardRequest) -> dict:
        return _lora_grads(response, request, self.lora)

    def param_grads(self, grads: dict, start: int, end: int) -> list[torch.Tensor]:
        out = []
        for block, name in self.lora.keys:
            if start <= block < end:
                a, b = self.lora.pair(block, name)
                ga, gb = grads[(block, name)]
                out += [ga.to(a.dtype), gb.to(b.dtype)]
        return out

    # --- in process

    def local_context(self, stack, start: int, end: int):
        """The stack's blocks [start, end) apply the fused weights (wrapping its linears on first use)."""
        attach_lora_wrappers(stack)
        lora = self.lora
        return use_adapter(fuse_weights(lora.weights(start, end), lora.scale, lora.family, lora.model_config))


def _lora_grads(response: BackwardResponse, request: BackwardRequest, lora: RemoteLora) -> dict:
    """The span's LoRA gradients by (block, module), checked against the client's own weights."""
    expected = {(b, n) for b, n in lora.keys if request.start <= b < request.end}
    got = {(item.block, item.target): (item.a, item.b) for item in response.adapter_grads}
    if response.grad_hidden.shape != request.hidden.shape or set(got) != expected:
        raise ValueError("the server answered LoRA gradients that do not match the request")
    for (block, name), (ga, gb) in got.items():
        a, b = lora.pair(block, name)
        if ga.shape != a.shape or gb.shape != b.shape:
            raise ValueError(f"the server answered LoRA gradients of the wrong shape for block {block} {name}")
    return got
