"""Exact-match tests against transformers on tiny random checkpoints of every supported family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla.models import BlockStack, ClientHead

ATOL = 1e-4
SEQ = 10


def generate_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids the way transformers' `generate` computes them for a (left-)padded prompt."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def _ids(vocab: int, batch: int = 2, length: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _plain(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(length).expand(batch, length)
    return positions, torch.ones(batch, length, dtype=torch.bool)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    name, path, model = checkpoint
    stack = BlockStack.load(path, 0, model.config.num_hidden_layers, dtype=torch.float32, progress=False)
    head = ClientHead.load(path, dtype=torch.float32, progress=False)
    return name, path, model, stack, head


@torch.no_grad()
def test_block_by_block(loaded):
    _, _, model, stack, _ = loaded
    ids = _ids(model.config.vocab_size)
    captured = {}
    base = model.base_model
    final_norm = base.norm if hasattr(base, "norm") else base.ln_f
    hook = final_norm.register_forward_pre_hook(lambda module, args: captured.update(last=args[0]))
    try:
        hidden_states = model(ids, output_hidden_states=True).hidden_states
    finally:
        hook.remove()
    count = model.config.num_hidden_layers
    # hidden_states[i] is block i's input; the final norm's input is the last block's output
    expected = [*hidden_states[1:count], captured["last"]]
    positions, mask = _plain(*ids.shape)
    for index in range(count):
        ours = stack(hidden_states[index], positions, mask, blocks=(index, index + 1))
        torch.testing.assert_close(ours, expected[index], atol=ATOL, rtol=0, msg=f"block {index}")


@torch.no_grad()
def test_whole_model_and_split(loaded):
    _, path, model, stack, head = loaded
    ids = _ids(model.config.vocab_size)
    reference = model(ids).logits
    positions, mask = _plain(*ids.shape)
    logits = head.logits(stack(head.embed(ids), positions, mask))
    torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)

    middle = model.config.num_hidden_layers // 2
    first = BlockStack.load(path, 0, middle, dtype=torch.float32, progress=False)
    second = BlockStack.load(path, middle, model.config.num_hidden_layers, dtype=torch.float32, progress=False)
    hidden = second(first(head.embed(ids), positions, mask), positions, mask)
    torch.testing.assert_close(head.logits(hidden), reference, atol=ATOL, rtol=0)


@torch.no_grad()
def test_incremental_decoding_matches_full_forward(loaded):
    name, _, model, stack, head = loaded
    if name == "llama-dynamic":
        pytest.skip("dynamic NTK rope changes frequencies as the sequence grows: cached keys keep old ones")
    ids = _ids(model.config.vocab_size, length=SEQ)
    positions, mask = _plain(*ids.shape)
    full = stack(head.embed(ids), positions, mask)
    caches = stack.allocate_cache(batch=2, max_length=SEQ + 2)
    prefill = 4
    steps = [stack(head.embed(ids[:, :prefill]), positions[:, :prefill], mask[:, :prefill], caches, offset=0)]
    for offset in range(prefill, SEQ):
        token = slice(offset, offset + 1)
        steps.append(stack(head.embed(ids[:, token]), positions[:, token], mask[:, : offset + 1], caches, offset))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    torch.testing.assert_close(head.logits(torch.cat(steps, dim=1)), model(ids).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padded_batch(loaded):
    name, _, model, stack, head = loaded
    ids = _ids(model.config.vocab_size, batch=3, length=SEQ, seed=3)
    pads = [0, 3, 6]
    mask = torch.ones_like(ids, dtype=torch.bool)
    for row, pad in enumerate(pads):
        ids[row, :pad] = model.config.pad_token_id
        mask[row, :pad] = False
    positions = generate_positions(mask)
    reference = model(ids, attention_mask=mask.long(), position_ids=positions).logits
    logits = head.logits(stack(head.embed(ids), positions, mask))
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[mask], reference[mask], atol=ATOL, rtol=0)
    if name == "llama-dynamic":
        return
    caches = stack.allocate_cache(batch=3, max_length=SEQ)
    prefill = 7
    steps = [stack(head.embed(ids[:, :prefill]), positions[:, :prefill], mask[:, :prefill], caches)]
    for offset in range(prefill, SEQ):
        token = slice(offset, offset + 1)
        steps.append(stack(head.embed(ids[:, token]), positions[:, token], mask[:, : offset + 1], caches, offset))
    incremental = head.logits(torch.cat(steps, dim=1))
    torch.testing.assert_close(incremental[mask], reference[mask], atol=ATOL, rtol=0)


@torch.no_grad()
def test_greedy_generation_matches_transformers_generate(llama_checkpoint):
    path, model = llama_checkpoint
    stack = BlockStack.load(path, 0, model.config.num_hidden_layers, dtype=torch.float32, progress=False)
    head = ClientHead.load(path, dtype=torch.float32, progress=False)
    ids = _ids(model.config.vocab_size, batch=2, length=6, seed=5)
    ids[1, :2] = model.config.pad_token_id
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    new_tokens = 5
    expected = model.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None
    )

    caches = stack.allocate_cache(batch=2, max_length=ids.shape[1] + new_tokens)
    positions = generate_positions(mask)
    tokens, step_ids, offset = ids, ids, 0
    for _ in range(new_tokens):
        hidden = stack(head.embed(step_ids), positions, mask.bool(), caches, offset)
        offset += step_ids.shape[1]
        step_ids = head.logits(hidden[:, -1:]).argmax(-1)
        tokens = torch.cat([tokens, step_ids], dim=1)
        positions = positions[:, -1:] + 1  # what generate does: last position + 1
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
    assert torch.equal(tokens, expected)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_transformers(llama_checkpoint, dtype):
    path, model = llama_checkpoint
    reference_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    stack = BlockStack.load(path, 0, model.config.num_hidden_layers, dtype=dtype, progress=False)
    head = ClientHead.load(path, dtype=dtype, progress=False)
    ids = _ids(model.config.vocab_size)
    positions, mask = _plain(*ids.shape)
    logits = head.logits(stack(head.embed(ids), positions, mask))
    assert logits.dtype == dtype
    # bit-identical on CPU today; the tolerance leaves room for other kernels' rounding
    torch.testing.assert_close(logits.float(), reference_model(ids).logits.float(), atol=2e-2, rtol=0)


def test_backward_matches_transformers(llama_checkpoint):
    """Servers run forward/backward without caches (fine-tuning): input gradients must match."""
    path, model = llama_checkpoint
    stack = BlockStack.load(path, 0, model.config.num_hidden_layers, dtype=torch.float32, progress=False)
    head = ClientHead.load(path, dtype=torch.float32, progress=False)
    ids = _ids(model.config.vocab_size)
    positions, mask = _plain(*ids.shape)
    ours_input = head.embed(ids).detach().requires_grad_()
    theirs_input = ours_input.detach().clone().requires_grad_()
    weights = torch.randn(*ids.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(1))
    (head.logits(stack(ours_input, positions, mask)) * weights).sum().backward()
    (model(inputs_embeds=theirs_input).logits * weights).sum().backward()
    torch.testing.assert_close(ours_input.grad, theirs_input.grad, atol=ATOL, rtol=1e-4)
