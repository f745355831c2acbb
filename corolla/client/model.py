"""The HF-compatible client models: `AutoDistributedModelForCausalLM`, `DistributedLlamaForCausalLM`, ...

A Petals script runs after replacing `petals` with `corolla`. The client holds only the embeddings, the
final norm and the LM head (`ClientHead`); the blocks are a `RemoteChain` behind `model.model.layers`
(a `RemoteSequential`).

Decisions:

- **transformers' own generate.** The classes subclass `PreTrainedModel` + `GenerationMixin` and do not
  re-implement sampling, logits processors, stopping criteria or streamers. `generate` runs transformers'
  generate with `use_cache=False`, so transformers passes the whole sequence (and its position ids and
  attention mask) at every step and keeps no cache of its own; `forward`, inside a `GenerationSession`,
  sends only the tokens the server-side caches have not seen. Position ids are transformers' (it derives
  them from the attention mask: left padding gets the same positions as with `LlamaForCausalLM`), so
  greedy output is token-exact with transformers on the same checkpoint. Beam search works unchanged:
  when transformers reorders its hypotheses, the session sees rows continuing other rows and has every
  server reorder its cache rows before the next step (`GenerationSession`, `hypo_ids`).
- **Sessions as in Petals.** `model.inference_session(max_length=N)` opens one (a context manager that
  also makes it the model's active session, per thread); `generate(..., session=s)` or a `generate`
  inside `with model.inference_session(...)` continues a conversation: the caller passes only the new
  tokens and gets back those tokens plus the generated ones (Petals' convention: earlier calls' tokens
  are cropped; `generate(None, ...)` returns only the continuation), and only new tokens go to the
  chain. Without a session, `generate` opens one sized prompt + `max_new_tokens` (else `max_length`)
  and closes it at the end. `model(input_ids)` inside an active session also steps it; see
  `corolla.client.generation` for how full histories and new-token inputs are told apart.
- **Without a session**, `forward` runs whole sequences through `chain.forward` (logits for every
  position; positions 0..T-1 unless given, as `LlamaModel.forward`), with autograd through the chain.
- **Loading** is `DistributedPreTrainedModel.from_pretrained` (`corolla.client.hf_model`), plus the
  generation config (`generation_config.json`, else derived from the config).
- **Families** come from `hf_model.FAMILIES`; `AutoDistributedModelForCausalLM` reads `model_type` from
  config.json and dispatches. A family is registered only if `corolla.models` supports it.
"""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from corolla.client.active_adapter import using_adapter
from corolla.client.chain import RemoteChain
from corolla.client.generation import GenerationSession
from corolla.client.hf_model import (
    DistributedPreTrainedModel,
    RemoteDecoderModel,
    auto_class,
    family_class_names,
    family_classes,
)
from corolla.client.speculative import (
    AssistantDrafter,
    PromptLookupDrafter,
    check_supported,
    speculative_generate,
    warpers_for,
)
from corolla.models.checkpoint import Checkpoint, CheckpointError
from corolla.models.client_head import ClientHead

__all__ = [
    "MODEL_CLASSES",
    "AutoDistributedModelForCausalLM",
    "DistributedModelForCausalLM",
    "RemoteDecoderModel",
    "register_model_class",
    *family_class_names("ForCausalLM"),
]


class DistributedModelForCausalLM(DistributedPreTrainedModel, GenerationMixin):
    """A causal LM whose blocks run on a `RemoteChain`; generation is transformers' `generate`."""

    auto_name = "AutoDistributedModelForCausalLM"

    def __init__(self, config, head: ClientHead, chain: RemoteChain, *, tuning_mode=None, pre_seq_len: int = 0):
        super().__init__(config, head, chain, tuning_mode=tuning_mode, pre_seq_len=pre_seq_len)
        self.lm_head = head.lm_head if head.lm_head is not None else _tied_lm_head(head.embed_tokens)
        self._active_sessions: dict[int, list[GenerationSession]] = {}  # thread id -> stack

    def _finish_loading(self, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
        self.generation_config = _load_generation_config(checkpoint, self.config)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    # -- sessions ------------------------------------------------------------------------------------

    def inference_session(self, max_length: int, active_adapter: str | None = None) -> GenerationSession:
        """Open a session over every block for up to `max_length` tokens; use it as a context manager.

        `active_adapter` names a served LoRA adapter for this session (default: `model.config.active_adapter`)."""
        if active_adapter is None and self._configured_adapter() is not None:
            return self.inference_session(max_length, active_adapter=self._configured_adapter())
        if active_adapter is not None:
            with using_adapter(active_adapter):
                return self._open_session(max_length)
        return self._open_session(max_length)

    def _open_session(self, max_length: int) -> GenerationSession:
        if self.ptune is not None:
            session = self.ptune.open_session(self.model.layers, max_length)
            return GenerationSession(session, max_length, owner=self)
        return GenerationSession(self.model.layers.inference_session(max_length), max_length, owner=self)

    @property
    def active_session(self) -> GenerationSession | None:
        """The innermost session activated in this thread (`with session:`), if any."""
        stack = self._active_sessions.get(threading.get_ident())
        return stack[-1] if stack else None

    def activate_session(self, session: GenerationSession) -> None:
        self._active_sessions.setdefault(threading.get_ident(), []).append(session)

    def deactivate_session(self, session: GenerationSession) -> None:
        stack = self._active_sessions.get(threading.get_ident(), [])
        if session in stack:
            stack.remove(session)
        if not stack:
            self._active_sessions.pop(threading.get_ident(), None)

    @contextmanager
    def use_session(self, session: GenerationSession | None):
        """Petals' context manager: ``session`` is the active one inside the block (None: nothing changes)."""
        if session is None:
            yield self.active_session
            return
        self.activate_session(session)
        try:
            yield session
        finally:
            self.deactivate_session(session)

    @contextmanager
    def _using_session(self, session: GenerationSession, full_history: bool | None):
        self.activate_session(session)
        previous, session.full_history = session.full_history, full_history
        try:
            yield session
        finally:
            session.full_history = previous
            self.deactivate_session(session)

    # -- forward and generate ------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits for every given position, or, in an active session, for the tokens it had not seen."""
        _check_forward_options(kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        session = self.active_session
        if session is None:
            hidden = self._hidden_states(input_ids, attention_mask, position_ids, inputs_embeds)
        else:
            if labels is not None:
                raise ValueError("labels are not supported inside an inference session; call the model outside it")
            prepared = session.prepare_step(
                self.model.embed_tokens,
                input_ids,
                inputs_embeds,
                attention_mask,
                position_ids,
                session.full_history,
            )
            hidden = self.model.norm(session.step(prepared)[:, -prepared.num_outputs :])
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        output = CausalLMOutputWithPast(loss=loss, logits=logits)
        return output if return_dict is not False else output.to_tuple()

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        *args,
        session: GenerationSession | None = None,
        active_adapter: str | None = None,
        **kwargs,
    ):
        """transformers' generate. In a session (given, or active) `inputs` are the new tokens only, and the
        result is this call's inputs followed by the generated tokens, as in Petals: the tokens of earlier
        calls are not repeated, and `generate(None, max_new_tokens=n, session=s)` returns just the n tokens
        that continue the conversation. Without a session the result is the prompt and the new tokens.

        `active_adapter` names a served LoRA adapter for this call (default: `model.config.active_adapter`, as
        in Petals; a given `session` keeps its own)."""
        if active_adapter is None:
            active_adapter = self._configured_adapter()
        if active_adapter is not None:
            with using_adapter(active_adapter):
                return self._generate(inputs, *args, session=session, **kwargs)
        return self._generate(inputs, *args, session=session, **kwargs)

    def _generate(self, inputs, *args, session: GenerationSession | None, **kwargs):
        for name in ("past_key_values", "cache"):
            if kwargs.get(name) is not None:
                raise NotImplementedError(f"{name}: the caches live on the servers; pass session= instead")
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        config = kwargs.get("generation_config") or self.generation_config
        session = session if session is not None else self.active_session
        owned = session is None
        if owned:
            if not _sized(kwargs, config):
                raise ValueError(
                    "generate outside an inference session needs max_new_tokens or max_length: they size the "
                    "servers' KV caches (as in Petals); or call it inside `with model.inference_session(max_length="
                    "N):`"
                )
            session = self.inference_session(self._session_length(input_ids, kwargs, config))
        try:
            earlier = session.length  # tokens of earlier calls: not part of this call's result
            input_ids, attention_mask = session.history_with(input_ids, kwargs.pop("attention_mask", None))
            if _speculating(kwargs, config):
                result = self._speculative_generate(session, input_ids, attention_mask, args, kwargs)
                return result[:, earlier:]
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask
            if kwargs.get("generation_config") is not None:  # transformers warns about kwargs beside a config
                kwargs["generation_config"] = copy.deepcopy(kwargs["generation_config"])
                kwargs["generation_config"].use_cache = False
            else:
                kwargs["use_cache"] = False
            with self._using_session(session, full_history=True if input_ids is not None else None):
                result = super().generate(input_ids, *args, **kwargs)
            if input_ids is not None:
                session.record_output(result if isinstance(result, torch.Tensor) else result.sequences)
            return _without_earlier(result, earlier)
        finally:
            if owned:
                session.close()

    def _speculative_generate(self, session: GenerationSession, input_ids, attention_mask, args, kwargs):
        """``generate`` with ``prompt_lookup_num_tokens`` or ``assistant_model``: see `corolla.client.speculative`."""
        if args:
            raise TypeError("pass generate's options by name when speculating")
        if input_ids is None:
            raise ValueError("speculative decoding needs input_ids (or a session with a token history)")
        config = copy.deepcopy(kwargs.pop("generation_config", None) or self.generation_config)
        streamer = kwargs.pop("streamer", None)
        assistant = kwargs.pop("assistant_model", None)
        generator = kwargs.pop("generator", None)
        unused = config.update(**kwargs)
        if unused:
            raise NotImplementedError(f"not supported with speculative decoding: {', '.join(sorted(unused))}")
        check_supported(config, input_ids.shape[0], attention_mask)
        if assistant is not None:
            drafter = AssistantDrafter(assistant, config, warpers_for(config), generator)
        else:
            drafter = PromptLookupDrafter(config.prompt_lookup_num_tokens, config.max_matching_ngram_size or 2)
        if config.max_new_tokens is not None:
            max_new = config.max_new_tokens
        else:
            max_new = config.max_length - input_ids.shape[1]
        self.speculation_stats = {}
        return speculative_generate(
            self, session, input_ids, config, drafter, max_new_tokens=max_new, streamer=streamer,
            generator=generator, stats=self.speculation_stats,
        )  # fmt: skip

    @staticmethod
    def _session_length(input_ids: torch.Tensor | None, kwargs: dict, config: GenerationConfig) -> int:
        """Tokens a one-call session must hold: the prompt plus what generate may add."""
        embeds = kwargs.get("inputs_embeds")
        prompt = input_ids.shape[1] if input_ids is not None else embeds.shape[1] if embeds is not None else 1
        if kwargs.get("max_new_tokens") is not None:
            total = prompt + kwargs["max_new_tokens"]
        elif kwargs.get("max_length") is not None:
            total = kwargs["max_length"]
        elif config.max_new_tokens is not None:
            total = prompt + config.max_new_tokens
        else:
            total = config.max_length
        return max(total, prompt + 1)


def _sized(kwargs: dict, config: GenerationConfig) -> bool:
    """Whether a generate call says how long it may grow: max_new_tokens or max_length given, or set in its
    generation config (other than transformers' default max_length)."""
    if kwargs.get("max_new_tokens") is not None or kwargs.get("max_length") is not None:
        return True
    return config.max_new_tokens is not None or config.max_length != GenerationConfig().max_length


#: model_type -> causal-LM class, for `AutoDistributedModelForCausalLM`
MODEL_CLASSES: dict[str, type[DistributedModelForCausalLM]] = {}
family_classes(DistributedModelForCausalLM, "ForCausalLM", globals(), MODEL_CLASSES)
AutoDistributedModelForCausalLM = auto_class(
    "AutoDistributedModelForCausalLM", MODEL_CLASSES, "distributed causal LM", __name__
)


def register_model_class(cls: type[DistributedModelForCausalLM]) -> type[DistributedModelForCausalLM]:
    """Make `AutoDistributedModelForCausalLM` use `cls` for its config class's `model_type`."""
    MODEL_CLASSES[cls.config_class.model_type] = cls
    return cls


def _without_earlier(result, earlier: int):
    """``generate``'s result without the first ``earlier`` tokens (a tensor, or an output's ``sequences``)."""
    if not earlier:
        return result
    if isinstance(result, torch.Tensor):
        return result[:, earlier:]
    result.sequences = result.sequences[:, earlier:]
    return result


def _speculating(kwargs: dict, config: GenerationConfig) -> bool:
    """Whether a generate call asks for assisted (speculative) generation, transformers' way."""
    given = kwargs.get("generation_config") or config
    return (
        kwargs.get("assistant_model") is not None
        or kwargs.get("prompt_lookup_num_tokens") is not None
        or given.prompt_lookup_num_tokens is not None
    )


#: forward options that generate passes and a remote model has nothing to do with (the caches live on the servers)
_CACHE_OPTIONS = ("use_cache", "cache_position")


def _check_forward_options(kwargs: dict) -> None:
    """Refuse by name what `forward` cannot honour instead of ignoring it: a local cache holding a past (an
    empty one, which generate makes for `inputs_embeds`, is harmless), per-layer outputs, unknown options."""
    for name in ("past_key_values", "cache"):
        cache = kwargs.get(name)
        if cache is not None and (not hasattr(cache, "get_seq_length") or cache.get_seq_length() > 0):
            raise NotImplementedError(
                f"{name}: the caches live on the servers; use model.inference_session() instead"
            )
    for name in ("output_attentions", "output_hidden_states"):
        if kwargs.get(name):
            raise NotImplementedError(
                f"{name}=True: the blocks run on the servers, which return only the last layer"
            )
    unknown = sorted(set(kwargs) - {"past_key_values", "cache", "output_attentions", "output_hidden_states"}
                     - set(_CACHE_OPTIONS))  # fmt: skip
    if unknown:
        raise TypeError(f"unexpected forward options: {', '.join(unknown)}")


def _tied_lm_head(embed_tokens: nn.Embedding) -> nn.Linear:
    """An LM head that shares the embedding matrix (tie_word_embeddings)."""
    head = nn.Linear(embed_tokens.embedding_dim, embed_tokens.num_embeddings, bias=False, device="meta")
    head.weight = embed_tokens.weight
    return head


def _load_generation_config(checkpoint: Checkpoint, config) -> GenerationConfig:
    """The checkpoint's generation_config.json (found like every other file, honouring the HF cache and
    offline settings), else one derived from the model config."""
    try:
        path = checkpoint.file("generation_config.json")
    except (CheckpointError, OSError):
        return GenerationConfig.from_model_config(config)
    return GenerationConfig.from_pretrained(path.parent, "generation_config.json")
