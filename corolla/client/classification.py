"""Sequence classification through the swarm: `AutoDistributedModelForSequenceClassification` and family classes.

The client holds the embeddings, the final norm and a score head (``score``: ``nn.Linear(H, num_labels,
bias=False)``); the blocks are remote, as for the causal LM. Semantics are transformers'
``LlamaForSequenceClassification``: logits of every position, pooled at the last token that is not
``pad_token_id`` (the rightmost, so left and right padding both work; position -1 when the config has no
pad token, which then allows only batches of one), and transformers' own loss for ``labels``
(regression, single- or multi-label classification, by ``config.problem_type``).

The score head is read from the checkpoint when it has one (``score.weight``, a saved
``*ForSequenceClassification``), else initialised as transformers does (normal, ``initializer_range``).
With ``tuning_mode`` the prompts and the score head train; the embeddings and norm are frozen.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import (
    BloomConfig,
    FalconConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from corolla.client.chain import RemoteChain
from corolla.client.model import RemoteDecoderModel, auto_from_pretrained, load_client
from corolla.client.ptune import PromptTuning
from corolla.client.remote_sequential import RemoteSequential
from corolla.models.checkpoint import Checkpoint
from corolla.models.client_head import ClientHead
from corolla.models.registry import supported_model_types

__all__ = [
    "AutoDistributedModelForSequenceClassification",
    "DistributedBloomForSequenceClassification",
    "DistributedFalconForSequenceClassification",
    "DistributedLlamaForSequenceClassification",
    "DistributedMistralForSequenceClassification",
    "DistributedMixtralForSequenceClassification",
    "DistributedModelForSequenceClassification",
    "DistributedQwen2ForSequenceClassification",
    "DistributedQwen3ForSequenceClassification",
]

_CONFIG_OPTIONS = ("num_labels", "id2label", "label2id", "problem_type")


class DistributedModelForSequenceClassification(PreTrainedModel):
    """A sequence classifier whose blocks run on a `RemoteChain`."""

    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config, head: ClientHead, chain: RemoteChain, *, tuning_mode=None, pre_seq_len: int = 0):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = RemoteDecoderModel(head.embed_tokens, RemoteSequential(chain), head.norm)
        dtype = head.embed_tokens.weight.dtype
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False, dtype=dtype)
        with torch.no_grad():
            self.score.weight.normal_(0.0, getattr(config, "initializer_range", 0.02))
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
    ) -> DistributedModelForSequenceClassification:
        """Load the client's part and connect to the swarm (or `chain`); `num_labels=`, `id2label=`,
        `label2id=`, `problem_type=` override the config, as in transformers."""
        overrides = {name: options.pop(name) for name in _CONFIG_OPTIONS if name in options}
        ref, dtype, token, head, chain = load_client(
            cls, "AutoDistributedModelForSequenceClassification", model_name_or_path, initial_peers=initial_peers,
            dht_prefix=dht_prefix, dtype=dtype if dtype is not None else torch_dtype, revision=revision, token=token,
            chain=chain, options=options, progress=False,
        )  # fmt: skip
        head.lm_head = None  # a classifier has no LM head
        config = head.config
        # after connecting: the label settings are the client's, not part of the served model's config hash
        config = copy.deepcopy(config)
        for name, value in overrides.items():
            setattr(config, name, value)
        model = cls(config, head, chain, tuning_mode=tuning_mode, pre_seq_len=pre_seq_len)
        checkpoint = Checkpoint(ref, revision=revision, token=token)
        if "score.weight" in checkpoint.weight_map:
            weight = checkpoint.load_tensors(["score.weight"], dtype=dtype, progress=False)["score.weight"]
            if tuple(weight.shape) != tuple(model.score.weight.shape):
                raise ValueError(
                    f"the checkpoint's score.weight is {tuple(weight.shape)}, expected "
                    f"{tuple(model.score.weight.shape)} for num_labels={config.num_labels}"
                )
            with torch.no_grad():
                model.score.weight.copy_(weight)
        return model.eval()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    @property
    def chain(self) -> RemoteChain:
        return self.model.layers.chain

    def shutdown(self) -> None:
        """Leave the swarm: stop this client's network thread and libp2p daemon."""
        shutdown = getattr(self.chain, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        if self.ptune is not None:
            hidden = self.ptune.run(self.model, input_ids, attention_mask, position_ids, inputs_embeds)
        else:
            hidden = self.model(input_ids, attention_mask, position_ids, inputs_embeds).last_hidden_state
        logits = self.score(hidden)
        batch = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        if pad is None or input_ids is None:
            last = torch.full((batch,), -1, dtype=torch.long, device=logits.device)
        else:  # the rightmost token that is not padding (left or right padding)
            non_pad = (input_ids != pad).to(logits.device, torch.int32)
            last = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * non_pad).argmax(
                -1
            )
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        output = SequenceClassifierOutputWithPast(loss=loss, logits=pooled)
        return output if return_dict is not False else output.to_tuple()


class DistributedLlamaForSequenceClassification(DistributedModelForSequenceClassification):
    config_class = LlamaConfig


class DistributedMistralForSequenceClassification(DistributedModelForSequenceClassification):
    config_class = MistralConfig


class DistributedQwen2ForSequenceClassification(DistributedModelForSequenceClassification):
    config_class = Qwen2Config


class DistributedQwen3ForSequenceClassification(DistributedModelForSequenceClassification):
    config_class = Qwen3Config


class DistributedMixtralForSequenceClassification(DistributedModelForSequenceClassification):
    config_class = MixtralConfig


class DistributedBloomForSequenceClassification(DistributedModelForSequenceClassification):
    config_class = BloomConfig


class DistributedFalconForSequenceClassification(DistributedModelForSequenceClassification):
    config_class = FalconConfig


CLASSIFIER_CLASSES: dict[str, type[DistributedModelForSequenceClassification]] = {}


def register_classifier_class(cls: type[DistributedModelForSequenceClassification]):
    """Make `AutoDistributedModelForSequenceClassification` use `cls` for its config class's `model_type`."""
    CLASSIFIER_CLASSES[cls.config_class.model_type] = cls
    return cls


for _cls in (
    DistributedLlamaForSequenceClassification,
    DistributedMistralForSequenceClassification,
    DistributedQwen2ForSequenceClassification,
    DistributedQwen3ForSequenceClassification,
    DistributedMixtralForSequenceClassification,
    DistributedBloomForSequenceClassification,
    DistributedFalconForSequenceClassification,
):
    if _cls.config_class.model_type in supported_model_types():
        register_classifier_class(_cls)


class AutoDistributedModelForSequenceClassification:
    """Picks the distributed classifier from the checkpoint's `model_type`, like transformers' Auto classes."""

    def __init__(self, *args, **kwargs):
        raise TypeError("use AutoDistributedModelForSequenceClassification.from_pretrained(...)")

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, *, revision=None, token=None, **kwargs):
        return auto_from_pretrained(
            CLASSIFIER_CLASSES, "distributed classifier", model_name_or_path, revision=revision, token=token,
            **kwargs,
        )  # fmt: skip
