"""What every HF-facing distributed model class shares, and the per-family class list declared once.

`DistributedPreTrainedModel` is the base of the causal LM (`corolla.client.model`) and of the sequence
classifier (`corolla.client.classification`): it loads the client head (embeddings, final norm, optional
LM head) and connects its `RemoteChain`, builds `model.model` (LlamaModel's layout: `embed_tokens`,
`layers` as a `RemoteSequential`, `norm`), adds trainable prompts for `tuning_mode`, and runs the hidden
states of whole sequences through the chain. A subclass adds its head and its `forward`.

`FAMILIES` lists the HF families with a client class: `family_classes` derives, for one base class, a
subclass per family (`Distributed{Llama}{ForCausalLM}`, with the family's config class) and registers
those whose `model_type` `corolla.models` serves; `auto_class` makes the matching Auto class, which picks
the class from the checkpoint's `model_type`.

Loading: `from_pretrained` reads only the client tensors (`ClientHead.load`) and connects the swarm
through `RemoteSequenceManager.from_pretrained_args`, imported only there; tests pass
`chain=LocalChain(...)`. Default dtype float32; `torch_dtype`/`dtype` (transformers 5's name) accept
dtypes, names or "auto".
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from corolla.client.active_adapter import adapter_in_context, using_adapter
from corolla.client.chain import RemoteChain
from corolla.client.ptune import PromptTuning
from corolla.client.remote_sequential import RemoteSequential
from corolla.models.checkpoint import Checkpoint, default_dht_prefix
from corolla.models.client_head import ClientHead, NormedEmbedding
from corolla.models.registry import UnsupportedModelError, supported_model_types

__all__ = [
    "FAMILIES",
    "DistributedPreTrainedModel",
    "RemoteDecoderModel",
    "auto_class",
    "family_class_names",
    "family_classes",
]

#: (class-name stem, transformers config class name) of every family with client classes
FAMILIES: tuple[tuple[str, str], ...] = (
    ("Llama", "LlamaConfig"),
    ("Mistral", "MistralConfig"),
    ("Qwen2", "Qwen2Config"),
    ("Qwen3", "Qwen3Config"),
    ("Mixtral", "MixtralConfig"),
    ("Bloom", "BloomConfig"),
    ("Falcon", "FalconConfig"),
)

# from_pretrained options of transformers that change nothing for a client holding only the head (it always
# loads only its own tensors, from safetensors, with corolla's own model code)
_IGNORED_HF_OPTIONS = ("low_cpu_mem_usage", "trust_remote_code", "use_safetensors")


class RemoteDecoderModel(nn.Module):
    """`model.model`: embeddings, the remote blocks and the final norm (LlamaModel's layout).

    For BLOOM, `embed_tokens` applies the word-embeddings LayerNorm (`inputs_embeds` are post-norm)."""

    def __init__(self, embed_tokens: nn.Embedding, layers: RemoteSequential, norm: nn.Module):
        super().__init__()
        self.embed_tokens, self.layers, self.norm = embed_tokens, layers, norm

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    # Petals' and the HF families' own names for the same modules (BLOOM/Falcon: `transformer.h`,
    # `word_embeddings`, `ln_f`); aliases, not copies
    @property
    def h(self) -> RemoteSequential:
        return self.layers

    @property
    def word_embeddings(self) -> nn.Module:
        """The token embeddings; for BLOOM, without the LayerNorm that `embed_tokens` applies after them (Petals'
        layout: scripts apply `word_embeddings_layernorm` themselves)."""
        if isinstance(self.embed_tokens, NormedEmbedding):
            return _RawEmbedding(self.embed_tokens)
        return self.embed_tokens

    @property
    def ln_f(self) -> nn.Module:
        return self.norm

    @property
    def word_embeddings_layernorm(self) -> nn.Module:
        """BLOOM's LayerNorm after the word embeddings; `nn.Identity()` for families without one, as in Petals
        (scripts apply it after `word_embeddings` unconditionally)."""
        return getattr(self.embed_tokens, "norm", None) or nn.Identity()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Whole sequences through every block, no cache; `last_hidden_state` is after the final norm."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        hidden = self.layers(hidden, attention_mask=attention_mask, position_ids=position_ids)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden))


class _RawEmbedding(nn.Module):
    """A `NormedEmbedding`'s lookup without its norm (the same weight, not a copy): Petals' `word_embeddings`."""

    def __init__(self, embedding: NormedEmbedding):
        super().__init__()
        self.embedding = embedding

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.Embedding.forward(self.embedding, input_ids)


class DistributedPreTrainedModel(PreTrainedModel):
    """A model whose blocks run on a `RemoteChain`; subclasses add their head and `forward`."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    #: the Auto class users should call when the checkpoint's family does not match (error messages)
    auto_name = "AutoDistributedModel"
    #: whether `from_pretrained` shows download progress for the client tensors
    load_progress = True

    def __init__(self, config, head: ClientHead, chain: RemoteChain, *, tuning_mode=None, pre_seq_len: int = 0):
        super().__init__(config)
        self.model = RemoteDecoderModel(head.embed_tokens, RemoteSequential(chain), head.norm)
        #: trainable prompts (tuning_mode "ptune" / "deep_ptune"); the head is then frozen: only prompts
        #: (and a task head a subclass adds) train
        self.ptune = None if tuning_mode is None else PromptTuning(config, tuning_mode, pre_seq_len)
        if self.ptune is not None:
            head.requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str,
        *,
        initial_peers=None,
        dht_prefix: str | None = None,
        torch_dtype=None,
        dtype=None,
        revision: str | None = None,
        token: str | bool | None = None,
        chain: RemoteChain | None = None,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        **options,
    ):
        """Load the client head of a folder or Hub repo and connect it to the swarm (or to `chain`).

        `tuning_mode="ptune"` / `"deep_ptune"` with `pre_seq_len=K` adds K trainable prompts (see
        `corolla.client.ptune`); other keyword arguments configure the swarm client
        (`RemoteSequenceManager.from_pretrained_args`) and must be absent when `chain` is given.
        """
        for name in _IGNORED_HF_OPTIONS:
            options.pop(name, None)
        device_map = options.pop("device_map", None)
        if device_map not in (None, "cpu") and str(device_map) != "cpu":
            raise ValueError(
                f"device_map={device_map!r} is not supported: load on the CPU, then call model.to(device)"
            )
        token = options.pop("use_auth_token", token)
        config_overrides = cls._config_overrides(options)
        ref = str(model_name_or_path)
        dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype, ref, revision, token)
        head = ClientHead.load(ref, dtype=dtype, revision=revision, token=token, progress=cls.load_progress)
        config = head.config
        expected = getattr(cls.config_class, "model_type", None)
        if expected and config.model_type != expected:
            raise UnsupportedModelError(
                f"{cls.__name__} is for model_type {expected!r}, the checkpoint is {config.model_type!r}; "
                f"use {cls.auto_name}"
            )
        if chain is None:
            from corolla.client.sequence_manager import RemoteSequenceManager

            chain = RemoteSequenceManager.from_pretrained_args(
                model_ref=ref,
                config=config,
                initial_peers=initial_peers,
                dht_prefix=dht_prefix if dht_prefix is not None else default_dht_prefix(ref),
                **options,
            )
        elif options:
            raise TypeError(f"unexpected options with an explicit chain: {', '.join(sorted(options))}")
        from corolla.client.verification import configure_for_model

        configure_for_model(chain, config)
        # Petals' `model.config.active_adapter`: the served adapter of calls that name none (settable later)
        config.active_adapter = options.get("active_adapter")  # (options are empty with an explicit chain)
        if config_overrides:  # after connecting: they are the client's, not part of the served config's hash
            config = copy.deepcopy(config)
            for name, value in config_overrides.items():
                setattr(config, name, value)
        model = cls(config, head, chain, tuning_mode=tuning_mode, pre_seq_len=pre_seq_len)
        model._finish_loading(Checkpoint(ref, revision=revision, token=token), dtype)
        return model.eval()

    @classmethod
    def _config_overrides(cls, options: dict) -> dict:
        """Config fields a subclass lets `from_pretrained` set (popped from `options`); none by default."""
        return {}

    def _finish_loading(self, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
        """What a subclass reads from the checkpoint after the model is built (its head, generation config)."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    @property
    def chain(self) -> RemoteChain:
        return self.model.layers.chain

    @property
    def verification_stats(self) -> dict:
        """This client's checks of servers' outputs: checks, detections, reports (`corolla.client.verification`)."""
        from corolla.client.verification import verification_stats

        return verification_stats(self.chain)

    @property
    def transformer(self) -> RemoteDecoderModel:
        """`model.model` under the name BLOOM's and Falcon's classes (and Petals scripts) use."""
        return self.model

    def show_route(self) -> str:
        """The chain of servers a new session would use now."""
        return self.chain.show_route()

    def shutdown(self) -> None:
        """Leave the swarm: stop this client's network thread and libp2p daemon (nothing for a local chain)."""
        self.chain.shutdown()

    def _configured_adapter(self) -> str | None:
        """`model.config.active_adapter` (Petals' setting; "" when set to None, so that None means the base
        model rather than "no opinion"), or None if the config never had one or a caller chose for this call."""
        if "active_adapter" not in vars(self.config) or adapter_in_context():
            return None
        return self.config.active_adapter or ""

    def _hidden_states(self, input_ids, attention_mask, position_ids, inputs_embeds) -> torch.Tensor:
        """Whole sequences through the prompts (if tuning) and every block, after the final norm."""
        adapter = self._configured_adapter()
        with using_adapter(adapter) if adapter is not None else nullcontext():
            if self.ptune is not None:
                return self.ptune.run(self.model, input_ids, attention_mask, position_ids, inputs_embeds)
            return self.model(input_ids, attention_mask, position_ids, inputs_embeds).last_hidden_state


def family_class_names(suffix: str) -> list[str]:
    """The names `family_classes` defines for `suffix` (for a module's `__all__`)."""
    return [f"Distributed{stem}{suffix}" for stem, _ in FAMILIES]


def family_classes(base: type, suffix: str, namespace: dict, registry: dict[str, type]) -> None:
    """Define `Distributed{Family}{suffix}` (a subclass of `base` per `FAMILIES` entry) in `namespace`.

    The classes get `namespace`'s module as `__module__`, so they pickle and print like hand-written ones;
    those whose `model_type` corolla serves are added to `registry` (model_type -> class)."""
    served = set(supported_model_types())
    for stem, config_name in FAMILIES:
        config_class = getattr(transformers, config_name)
        name = f"Distributed{stem}{suffix}"
        cls = type(name, (base,), {"config_class": config_class, "__module__": namespace["__name__"]})
        cls.__qualname__ = name
        namespace[name] = cls
        if config_class.model_type in served:
            registry[config_class.model_type] = cls


def auto_class(name: str, registry: dict[str, type], what: str, module: str) -> type:
    """An Auto class: `from_pretrained` picks `registry[model_type]` from the checkpoint's config.json."""

    def from_pretrained(cls, model_name_or_path: str, *, revision=None, token=None, **kwargs):
        raw = Checkpoint(str(model_name_or_path), revision=revision, token=token).raw_config
        model_type = raw.get("model_type")
        if model_type not in registry:
            raise UnsupportedModelError(
                f"model_type {model_type!r} has no {what} class; supported: {', '.join(sorted(registry))}"
            )
        return registry[model_type].from_pretrained(model_name_or_path, revision=revision, token=token, **kwargs)

    def __init__(self, *args, **kwargs):
        raise TypeError(f"use {name}.from_pretrained(...)")

    doc = f"Picks the {what} class from the checkpoint's `model_type`, like transformers' Auto classes."
    namespace = {"__init__": __init__, "from_pretrained": classmethod(from_pretrained), "__doc__": doc}
    cls = type(name, (), {**namespace, "__module__": module})
    cls.__qualname__ = name
    return cls


def _resolve_dtype(value, model_ref: str, revision, token) -> torch.dtype:
    """None -> float32; "auto" -> the checkpoint's dtype (float32 if it names none); names -> torch dtypes."""
    if value is None:
        return torch.float32
    if value == "auto":
        raw = Checkpoint(model_ref, revision=revision, token=token).raw_config
        value = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}")
    return value
