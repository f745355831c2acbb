"""The HF-compatible client on a real swarm: logits, greedy generate (single and left-padded batch),
a session across two generate calls, and concurrent generations — each equal to local transformers."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaForCausalLM

from corolla import AutoDistributedModelForCausalLM, DistributedLlamaForCausalLM


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(shared_swarm, tiny_llama):
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=shared_swarm.initial_peers)
    yield model
    model.shutdown()


def _prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 320, (1, length), generator=torch.Generator().manual_seed(seed))


def test_model_class_and_logits_match(model, reference):
    assert isinstance(model, DistributedLlamaForCausalLM)
    ids = _prompt(12, seed=1)
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids).logits
    assert torch.allclose(got, expected, atol=1e-4)


def test_greedy_generate_is_token_exact(model, reference):
    ids = _prompt(16, seed=2)
    mask = torch.ones_like(ids)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    assert torch.equal(got, expected)


def test_left_padded_batch_is_token_exact(model, reference):
    rows = [_prompt(n, seed=10 + n)[0] for n in (5, 11, 8)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_session_across_two_generate_calls(model, reference):
    first, second = _prompt(9, seed=3), _prompt(4, seed=4)
    with model.inference_session(max_length=64) as session:
        out1 = model.generate(first, attention_mask=torch.ones_like(first), max_new_tokens=6, session=session)
        out2 = model.generate(second, attention_mask=torch.ones_like(second), max_new_tokens=6, session=session)
    history = torch.cat([out1, second], dim=1)
    expected = reference.generate(history, attention_mask=torch.ones_like(history), max_new_tokens=6)
    assert torch.equal(torch.cat([out1, out2], dim=1), expected)  # the second call returns its own tokens


def test_concurrent_generations_match_solo_runs(model, reference):
    prompts = [_prompt(6 + i, seed=20 + i) for i in range(3)]
    results, errors = {}, []

    def worker(i):
        try:
            ids = prompts[i]
            results[i] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    for i, ids in enumerate(prompts):
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12)
        assert torch.equal(results[i], expected), f"generation {i}"
