"""Sequence classification on a `LocalChain` against transformers' LlamaForSequenceClassification."""

from __future__ import annotations

import pytest
import torch
from ptune_reference import reference_forward
from transformers import LlamaForSequenceClassification

from corolla.client.classification import (
    AutoDistributedModelForSequenceClassification,
    DistributedLlamaForSequenceClassification,
)
from corolla.client.local_chain import LocalChain
from corolla.models.stack import BlockStack

LABELS, K = 3, 2


def _model(tiny_llama, **kwargs):
    stack = BlockStack.load(str(tiny_llama), 0, 8, dtype=torch.float32, progress=False)
    return AutoDistributedModelForSequenceClassification.from_pretrained(
        tiny_llama, chain=LocalChain(stack), num_labels=LABELS, **kwargs
    )


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return LlamaForSequenceClassification.from_pretrained(
        tiny_llama, num_labels=LABELS, dtype=torch.float32
    ).eval()


def _padded_batch():
    ids = torch.randint(3, 320, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[0, 5:], mask[0, 5:] = 0, 0  # right padding
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    return ids, mask


def test_logits_loss_and_gradients_match_transformers(tiny_llama, reference):
    model = _model(tiny_llama)
    assert isinstance(model, DistributedLlamaForSequenceClassification)
    with torch.no_grad():
        reference.score.weight.copy_(model.score.weight)
    ids, mask = _padded_batch()
    labels = torch.tensor([0, 2, 1])
    ours, theirs = (
        model(ids, attention_mask=mask, labels=labels),
        reference(ids, attention_mask=mask, labels=labels),
    )
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)
    ours.loss.backward()
    theirs.loss.backward()
    torch.testing.assert_close(model.score.weight.grad, reference.score.weight.grad, atol=1e-5, rtol=1e-4)
    reference.zero_grad()


def test_prompt_tuned_classifier(tiny_llama, reference):
    model = _model(tiny_llama, tuning_mode="deep_ptune", pre_seq_len=K)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        model.ptune.intermediate_prompt_embeddings.weight.normal_(0, 0.3)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "ptune.intermediate_prompt_embeddings.weight", "ptune.prompt_embeddings.weight", "score.weight"
    ]  # fmt: skip
    ids, mask = _padded_batch()
    ids, mask = ids[[0, 2]], mask[[0, 2]]  # right padding only: positions stay 0..K+T-1 in both
    ours = model(ids, attention_mask=mask, labels=torch.tensor([1, 2]))
    ours.loss.backward()
    assert model.ptune.intermediate_prompt_embeddings.weight.grad.abs().sum() > 0

    # the reference: transformers' blocks over [prompts, tokens] with the deep prompts hooked in
    prompts, deep = model.ptune.prompts()[0].detach(), model.ptune.deep_prompts()[:, 0].detach()
    with torch.no_grad():
        reference.score.weight.copy_(model.score.weight)

        class _Head(torch.nn.Module):  # reference_forward reads `.model` and calls the module for `.logits`
            def __init__(self, ref):
                super().__init__()
                self.model = ref.model

            def forward(self, inputs_embeds, attention_mask, use_cache):
                hidden = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
                return type("Out", (), {"logits": reference.score(hidden)})

        logits = reference_forward(_Head(reference), ids, prompts, deep, mask)
    last = torch.tensor([4, 6])
    torch.testing.assert_close(ours.logits, logits[torch.arange(2), last], atol=1e-4, rtol=0)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(Exception, match="gpt2"):
        AutoDistributedModelForSequenceClassification.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "family",
    ["mistral-full", "qwen2-sliding", "qwen3-sliding-bias", "mixtral-top2-sliding", "bloom", "falcon-new-gqa"],
)
def test_family_classifiers_match_transformers(tmp_path, family):
    from tiny_models import CONFIGS, make_checkpoint
    from transformers import AutoModelForSequenceClassification

    make_checkpoint(CONFIGS[family](), tmp_path)
    stack = BlockStack.load(str(tmp_path), 0, 4, dtype=torch.float32, progress=False)
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        tmp_path, chain=LocalChain(stack), num_labels=LABELS
    )
    reference = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, num_labels=LABELS, dtype=torch.float32
    )
    with torch.no_grad():
        reference.score.weight.copy_(model.score.weight)
        ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        ids[0, 4:], mask[0, 4:] = 0, 0  # right padding
        ours = model(ids, attention_mask=mask).logits
        theirs = reference.eval()(ids, attention_mask=mask).logits
    assert type(model).__name__.lower().startswith("distributed" + CONFIGS[family]().model_type)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
