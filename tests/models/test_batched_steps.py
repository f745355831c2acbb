"""Several sessions' steps as one forward (`step_sessions`): each session's outputs equal its solo run.

Sessions of different lengths, left padding, batch sizes, prefill chunks mixed with one-token steps, on
every attention variety (GQA, sliding windows, ALiBi, parallel attention, MoE, quantized blocks).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import CONFIGS, make_checkpoint

from corolla.models.quant import quantize_stack
from corolla.models.session import KVSession, SessionStep, step_sessions
from corolla.models.stack import BlockStack

ATOL = 1e-4
FAMILIES = ["llama-gqa-headdim-llama3-tied", "mistral-sliding", "qwen3-sliding-bias", "mixtral-top2-sliding",
            "bloom-6heads-postln-residual", "falcon-new-gqa", "falcon-alibi"]  # fmt: skip


@pytest.fixture(scope="module", params=FAMILIES)
def stack(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = make_checkpoint(CONFIGS[request.param](), path, seed=3)
    return BlockStack.load(str(path), 0, model.config.num_hidden_layers, dtype=torch.float32, progress=False)


def _sequence(stack, batch: int, length: int, pad: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, stack.config.hidden_size, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, :pad] = False  # row 0 left-padded
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return hidden, positions, mask


def _plans():
    """Per session: (batch, total length, left padding of row 0, step sizes)."""
    return [(1, 9, 0, [5, 1, 1, 1, 1]), (2, 8, 3, [2, 2, 1, 1, 1, 1]), (1, 12, 0, [1] * 4 + [8]), (3, 6, 1, [6])]


def _solo(stack, plan, seed):
    batch, length, pad, sizes = plan
    hidden, positions, mask = _sequence(stack, batch, length, pad, seed)
    session = KVSession(stack, stack.start, stack.end, batch, length)
    outs, offset = [], 0
    for size in sizes:
        sl = slice(offset, offset + size)
        outs.append(session.step(offset, hidden[:, sl], positions[:, sl], mask[:, sl]))
        offset += size
    return outs


@torch.no_grad()
def _batched(stack, plans):
    """All sessions advance together: round r batches the r-th step of every session that has one."""
    inputs = [_sequence(stack, p[0], p[1], p[2], seed) for seed, p in enumerate(plans)]
    sessions = [KVSession(stack, stack.start, stack.end, p[0], p[1]) for p in plans]
    offsets, outs = [0] * len(plans), [[] for _ in plans]
    for r in range(max(len(p[3]) for p in plans)):
        members = [i for i, p in enumerate(plans) if r < len(p[3])]
        steps = []
        for i in members:
            hidden, positions, mask = inputs[i]
            sl = slice(offsets[i], offsets[i] + plans[i][3][r])
            steps.append(SessionStep(sessions[i], offsets[i], hidden[:, sl], positions[:, sl], mask[:, sl]))
        for i, out in zip(members, step_sessions(steps)):
            outs[i].append(out)
            offsets[i] += plans[i][3][r]
    return outs, sessions


@torch.no_grad()
def test_a_batch_of_sessions_equals_each_session_alone(stack):
    plans = _plans()
    batched, sessions = _batched(stack, plans)
    for seed, plan in enumerate(plans):
        solo = _solo(stack, plan, seed)
        assert len(solo) == len(batched[seed])
        for a, b in zip(solo, batched[seed]):
            torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
        assert sessions[seed].length == plan[1]


@torch.no_grad()
def test_quantized_blocks_batch_too(tmp_path):
    model = make_checkpoint(CONFIGS["llama-mha"](), tmp_path, seed=4)
    stack = BlockStack.load(str(tmp_path), 0, model.config.num_hidden_layers, dtype=torch.float32, progress=False)
    quantize_stack(stack, "int8")
    plans = _plans()
    batched, _ = _batched(stack, plans)
    for seed, plan in enumerate(plans):
        for a, b in zip(_solo(stack, plan, seed), batched[seed]):
            torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


def test_a_batch_refuses_mixed_blocks_and_repeated_sessions(tmp_path):
    model = make_checkpoint(CONFIGS["llama-mha"](), tmp_path, seed=4)
    blocks = model.config.num_hidden_layers
    stack = BlockStack.load(str(tmp_path), 0, blocks, dtype=torch.float32, progress=False)
    hidden, positions, mask = _sequence(stack, 1, 2, 0, 0)
    whole, part = KVSession(stack, 0, blocks, 1, 4), KVSession(stack, 0, 1, 1, 4)
    with pytest.raises(ValueError, match="same blocks"):
        step_sessions(
            [SessionStep(whole, 0, hidden, positions, mask), SessionStep(part, 0, hidden, positions, mask)]
        )
    with pytest.raises(ValueError, match="one step per session"):
        step_sessions([SessionStep(whole, 0, hidden, positions, mask)] * 2)
