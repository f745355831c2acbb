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

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from corolla.client.chain import RemoteChain
from corolla.client.hf_model import DistributedPreTrainedModel, auto_class, family_class_names, family_classes
from corolla.models.checkpoint import Checkpoint
from corolla.models.client_head import ClientHead

__all__ = [
    "CLASSIFIER_CLASSES",
    "AutoDistributedModelForSequenceClassification",
    "DistributedModelForSequenceClassification",
    "register_classifier_class",
    *family_class_names("ForSequenceClassification"),
]

_CONFIG_OPTIONS = ("num_labels", "id2label", "label2id", "problem_type")


class DistributedModelForSequenceClassification(DistributedPreTrainedModel):
    """A sequence classifier whose blocks run on a `RemoteChain`.

    `from_pretrained` also takes `num_labels=`, `id2label=`, `label2id=`, `problem_type=`, which override
    the config as in transformers."""

    auto_name = "AutoDistributedModelForSequenceClassification"
    load_progress = False

    def __init__(self, config, head: ClientHead, chain: RemoteChain, *, tuning_mode=None, pre_seq_len: int = 0):
        super().__init__(config, head, chain, tuning_mode=tuning_mode, pre_seq_len=pre_seq_len)
        self.num_labels = config.num_labels
        dtype = head.embed_tokens.weight.dtype
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False, dtype=dtype)
        with torch.no_grad():
            self.score.weight.normal_(0.0, getattr(config, "initializer_range", 0.02))

    @classmethod
    def _config_overrides(cls, options: dict) -> dict:
        return {name: options.pop(name) for name in _CONFIG_OPTIONS if name in options}

    def _finish_loading(self, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
        """The checkpoint's score head, when it has one (a saved `*ForSequenceClassification`)."""
        if "score.weight" not in checkpoint.weight_map:
            return
        weight = checkpoint.load_tensors(["score.weight"], dtype=dtype, progress=False)["score.weight"]
        if tuple(weight.shape) != tuple(self.score.weight.shape):
            raise ValueError(
                f"the checkpoint's score.weight is {tuple(weight.shape)}, expected "
                f"{tuple(self.score.weight.shape)} for num_labels={self.config.num_labels}"
            )
        with torch.no_grad():
            self.score.weight.copy_(weight)

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
        hidden = self._hidden_states(input_ids, attention_mask, position_ids, inputs_embeds)
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


#: model_type -> classifier class, for `AutoDistributedModelForSequenceClassification`
CLASSIFIER_CLASSES: dict[str, type[DistributedModelForSequenceClassification]] = {}
family_classes(
    DistributedModelForSequenceClassification, "ForSequenceClassification", globals(), CLASSIFIER_CLASSES
)
AutoDistributedModelForSequenceClassification = auto_class(
    "AutoDistributedModelForSequenceClassification", CLASSIFIER_CLASSES, "distributed classifier", __name__
)


def register_classifier_class(cls: type[DistributedModelForSequenceClassification]):
    """Make `AutoDistributedModelForSequenceClassification` use `cls` for its config class's `model_type`."""
    CLASSIFIER_CLASSES[cls.config_class.model_type] = cls
    return cls
