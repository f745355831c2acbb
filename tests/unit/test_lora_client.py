"""Client-owned LoRA on an in-process chain (no network) against PEFT: logits, gradients, optimizer steps,
saving in PEFT format; and generation with the trained LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import write_llama
from transformers import LlamaForCausalLM

from corolla import AutoDistributedModelForCausalLM
from corolla.client.local_chain import LocalChain
from corolla.client.lora import RemoteLora
from corolla.models.stack import BlockStack

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("ckpt") / "tiny-llama", num_hidden_layers=3)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def _model(checkpoint):
    chain = LocalChain(BlockStack.load(str(checkpoint), 0, 3, dtype=torch.float32, progress=False))
    return AutoDistributedModelForCausalLM.from_pretrained(checkpoint, chain=chain)


def _peft(reference, tmp_path, targets=TARGETS):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(reference), config)
    peft_model.save_pretrained(tmp_path / "init", safe_serialization=True)
    return peft_model, tmp_path / "init"


def _batch(seed=0):
    ids = torch.randint(3, 320, (2, 7), generator=torch.Generator().manual_seed(seed))
    return ids, ids.clone()


def test_new_lora_starts_at_the_base_model(checkpoint, reference):
    model = _model(checkpoint)
    lora = RemoteLora.attach(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"lora.params.{k}" for k in lora.params]
    ids, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)
    name = lora.current_name()
    assert lora.current_name() == name
    with torch.no_grad():
        lora.pair(0, "self_attn.v_proj")[1].add_(0.0)  # any in-place change (an optimizer step) is a new version
    assert lora.current_name() != name
    with pytest.raises(ValueError, match="embed_tokens"):
        RemoteLora(model.config, r=4, lora_alpha=8, target_modules=["embed_tokens"])


def test_steps_match_peft_and_save_loads_in_peft(checkpoint, reference, tmp_path):
    peft_model, init = _peft(reference, tmp_path)
    model = _model(checkpoint)
    lora = RemoteLora.attach(model, path=init)
    ours_opt = torch.optim.SGD(lora.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    losses = []
    for step in range(3):
        ids, labels = _batch(step)
        loss = model(ids, labels=labels).loss
        ref_loss = peft_model(input_ids=ids, labels=labels).loss
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
        loss.backward()
        ref_loss.backward()
        if step == 0:
            ref_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
            a, b = lora.pair(1, "self_attn.q_proj")
            key = "base_model.model.model.layers.1.self_attn.q_proj"
            torch.testing.assert_close(a.grad, ref_grads[f"{key}.lora_A.default.weight"], atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(b.grad, ref_grads[f"{key}.lora_B.default.weight"], atol=1e-6, rtol=1e-4)
        ours_opt.step(), ref_opt.step(), ours_opt.zero_grad(), ref_opt.zero_grad()
        losses.append(loss.item())
    saved = lora.save_pretrained(tmp_path / "trained")
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), saved).eval()
    ids, _ = _batch(9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(model(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=0)
    # generation uses the LoRA too (through an inference session), token-exact with the merged model
    merged = copy.deepcopy(loaded).merge_and_unload()
    prompt = ids[:1]
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(prompt, **kwargs), merged.generate(prompt, **kwargs))
