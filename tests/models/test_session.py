"""`KVSession`, the session code servers and the in-process chain share, against the stack's full forward."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CONFIGS, make_checkpoint

from corolla.models.client_head import ClientHead
from corolla.models.session import KVSession
from corolla.models.stack import BlockStack

ATOL = 1e-4


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = tmp_path_factory.mktemp("session-llama")
    model = make_checkpoint(CONFIGS["llama-gqa-headdim-llama3-tied"](), path, seed=2)
    blocks = model.config.num_hidden_layers
    stack = BlockStack.load(str(path), 0, blocks, dtype=torch.float32, progress=False)
    return model, stack, ClientHead.load(str(path), dtype=torch.float32, progress=False)


def _inputs(model, head, batch=2, length=10, seed=0):
    ids = torch.randint(1, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(length).expand(batch, length).contiguous()
    return head.embed(ids), positions, torch.ones(batch, length, dtype=torch.bool)


@torch.no_grad()
def test_steps_equal_the_full_forward(loaded):
    model, stack, head = loaded
    hidden, positions, mask = _inputs(model, head)
    full = stack(hidden, positions, mask)
    session = KVSession(stack, stack.start, stack.end, batch_size=2, max_length=12)
    outs = [session.step(0, hidden[:, :4], positions[:, :4], mask[:, :4])]
    for t in range(4, hidden.shape[1]):
        outs.append(session.step(t, hidden[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1]))
    assert session.length == hidden.shape[1]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_a_replayed_step_overwrites_instead_of_appending(loaded):
    model, stack, head = loaded
    hidden, positions, mask = _inputs(model, head, seed=1)
    session = KVSession(stack, stack.start, stack.end, batch_size=2, max_length=12)
    session.step(0, hidden[:, :6], positions[:, :6], mask[:, :6])
    # a different token at position 5 first, then the real one again at the same offset
    session.step(5, hidden[:, 2:3], positions[:, 5:6], mask[:, 5:6])
    again = session.step(5, hidden[:, 5:6], positions[:, 5:6], mask[:, 5:6])
    nxt = session.step(6, hidden[:, 6:7], positions[:, 6:7], mask[:, 6:7])
    full = stack(hidden[:, :7], positions[:, :7], mask[:, :7])
    torch.testing.assert_close(again, full[:, 5:6], atol=ATOL, rtol=0)
    torch.testing.assert_close(nxt, full[:, 6:7], atol=ATOL, rtol=0)
    assert session.length == 7


@torch.no_grad()
def test_a_span_of_the_stack(loaded):
    model, stack, head = loaded
    hidden, positions, mask = _inputs(model, head, seed=2)
    session = KVSession(stack, 1, stack.end, batch_size=2, max_length=10)
    out = session.step(0, hidden, positions, mask)
    torch.testing.assert_close(out, stack(hidden, positions, mask, None, 0, (1, stack.end)), atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padding_is_masked_in_the_cache(loaded):
    model, stack, head = loaded
    hidden, positions, mask = _inputs(model, head, seed=3)
    mask[1, :3] = False  # row 1 is left-padded by 3
    positions[1] = (torch.arange(10) - 3).clamp(min=0)
    full = stack(hidden, positions, mask)
    session = KVSession(stack, stack.start, stack.end, batch_size=2, max_length=10)
    outs = [session.step(0, hidden[:, :5], positions[:, :5], mask[:, :5])]
    for t in range(5, 10):
        outs.append(session.step(t, hidden[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1]))
    steps = torch.cat(outs, dim=1)
    torch.testing.assert_close(steps[mask], full[mask], atol=ATOL, rtol=0)


def test_refuses_what_would_corrupt_it(loaded):
    model, stack, head = loaded
    hidden, positions, mask = _inputs(model, head, length=4)
    with pytest.raises(ValueError, match="not within"):
        KVSession(stack, 0, stack.end + 1, batch_size=2, max_length=8)
    session = KVSession(stack, stack.start, stack.end, batch_size=2, max_length=6)
    with torch.no_grad():
        session.step(0, hidden, positions, mask)
        with pytest.raises(ValueError, match="offset 5"):  # a gap after the 4 cached tokens
            session.step(5, hidden[:, :1], positions[:, :1], mask[:, :1])
        with pytest.raises(ValueError, match="of 6 tokens"):  # past max_length
            session.step(4, hidden[:, :3], positions[:, :3], mask[:, :3])
    assert session.length == 4
