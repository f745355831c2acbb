"""Prompt tuning on a `LocalChain`, against transformers' LlamaForCausalLM with the same prompts.

The reference prepends the prompts as `inputs_embeds` and, for deep prompts, adds each block's prompt to
the first K hidden states with a forward pre-hook on every decoder layer (Petals' semantics). Logits,
losses and gradients of every prompt must match in fp32; greedy generation with trained prompts is
token-exact with a full-recompute greedy loop of the reference.
"""

from __future__ import annotations

import pytest
import torch
from ptune_reference import reference_forward
from transformers import LlamaForCausalLM

from corolla.client.local_chain import LocalChain
from corolla.client.model import AutoDistributedModelForCausalLM
from corolla.models.stack import BlockStack

K = 3


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def _model(tiny_llama, mode: str):
    stack = BlockStack.load(str(tiny_llama), 0, 8, dtype=torch.float32, progress=False)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, chain=LocalChain(stack), tuning_mode=mode, pre_seq_len=K
    )
    if mode == "deep_ptune":  # non-zero deep prompts, so that they matter
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(3)
            model.ptune.intermediate_prompt_embeddings.weight.normal_(0, 0.5)
    return model


def _params(model):
    deep = model.ptune.deep_prompts()
    return model.ptune.prompt_embeddings.weight, None if deep is None else deep[:, 0]


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompted_forward_and_gradients_match_transformers(tiny_llama, reference, mode):
    model = _model(tiny_llama, mode)
    ids = torch.randint(3, 320, (2, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    out = model(ids, labels=labels)
    out.loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["ptune.prompt_embeddings.weight"] + (
        ["ptune.intermediate_prompt_embeddings.weight"] if mode == "deep_ptune" else []
    )

    prompts, deep = (t.detach().clone().requires_grad_(True) if t is not None else None for t in _params(model))
    logits = reference_forward(reference, ids, prompts, deep)
    loss = reference.loss_function(logits=logits, labels=labels, vocab_size=reference.config.vocab_size)
    loss.backward()
    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.ptune.prompt_embeddings.weight.grad, prompts.grad, atol=1e-5, rtol=1e-4)
    if mode == "deep_ptune":
        ours = model.ptune.intermediate_prompt_embeddings.weight.grad
        ours = ours.view(K, 8, -1).permute(1, 0, 2)
        torch.testing.assert_close(ours, deep.grad, atol=1e-5, rtol=1e-4)
        assert deep.grad.abs().sum() > 0


def test_padded_prompted_forward(tiny_llama, reference):
    model = _model(tiny_llama, "deep_ptune")
    ids = torch.randint(3, 320, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding; positions default to 0..K+T-1, as LlamaModel.forward's
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        prompts, deep = _params(model)
        theirs = reference_forward(reference, ids, prompts, deep, mask)
    torch.testing.assert_close(ours[1, 2:], theirs[1, 2:], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_generation_with_prompts_is_token_exact(tiny_llama, reference, mode):
    model = _model(tiny_llama, mode)
    ids = torch.randint(3, 320, (2, 5), generator=torch.Generator().manual_seed(2))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    prompts, deep = _params(model)
    expected = ids
    with torch.no_grad():
        for _ in range(6):
            logits = reference_forward(reference, expected, prompts, deep)
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == expected.tolist()


def test_bad_tuning_options(tiny_llama):
    with pytest.raises(ValueError, match="tuning_mode"):
        _model(tiny_llama, "prefix")
    stack = BlockStack.load(str(tiny_llama), 0, 8, dtype=torch.float32, progress=False)
    with pytest.raises(ValueError, match="pre_seq_len"):
        AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, chain=LocalChain(stack), tuning_mode="ptune")
