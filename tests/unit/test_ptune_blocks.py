"""The pure pieces of fine-tuning: deep prompts over cached steps, the server's backward, batch chunks."""

from __future__ import annotations

import types

import pytest
import torch

from corolla.client import remote_autograd
from corolla.models.deep_prompts import prompt_overlap, run_blocks
from corolla.models.stack import BlockStack
from corolla.server.backward import TrainingBackend, check_prompts
from corolla.wire.errors import BadRequestError

K = 3


@pytest.fixture(scope="module")
def stack(tiny_llama):
    return BlockStack.load(str(tiny_llama), 0, 8, dtype=torch.float32, progress=False).requires_grad_(False)


def _inputs(seed: int, batch: int = 2, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, 64, generator=g)
    prompts = 0.5 * torch.randn(8, 1, K, 64, generator=g)
    positions = torch.arange(length).expand(batch, -1)
    mask = torch.ones(batch, length, dtype=torch.bool)
    return hidden, prompts, positions, mask


def test_prompt_overlap():
    assert [prompt_overlap(3, offset, 2) for offset in range(5)] == [2, 2, 1, 0, 0]
    assert prompt_overlap(3, 0, 10) == 3 and prompt_overlap(0, 0, 4) == 0


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_prompted_prefix_in_chunks_equals_one_forward(stack, chunk):
    """A cached session fed in chunks (a replay) gets the prompts at positions < K exactly as one forward."""
    hidden, prompts, positions, mask = _inputs(0)
    whole = run_blocks(stack, (0, 8), hidden, positions, mask, prompts)
    caches = stack.allocate_cache(2, 7)
    outs = []
    for begin in range(0, 7, chunk):
        sl = slice(begin, begin + chunk)
        end = min(begin + chunk, 7)
        outs.append(
            run_blocks(stack, (0, 8), hidden[:, sl], positions[:, sl], mask[:, :end], prompts, caches, begin)
        )
    torch.testing.assert_close(torch.cat(outs, dim=1), whole, atol=1e-5, rtol=0)
    without = run_blocks(stack, (0, 8), hidden, positions, mask, None)
    assert not torch.allclose(without, whole, atol=1e-3)  # the prompts matter


def test_span_backward_matches_autograd_and_never_touches_weights(stack):
    hidden, prompts, positions, mask = _inputs(1)
    grad_out = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(2))
    backend = types.SimpleNamespace(stack=stack, device=torch.device("cpu"), dtype=torch.float32)
    training = TrainingBackend(backend, max_batch_size=8, max_length=64)
    with torch.inference_mode():  # as on the compute worker
        grad_hidden, grad_prompts, extra = training.span_backward(
            2, 6, hidden, positions, mask, grad_out, prompts[2:6]
        )
    h, p = hidden.clone().requires_grad_(True), prompts[2:6].clone().requires_grad_(True)
    (run_blocks(stack, (2, 6), h, positions, mask, p) * grad_out).sum().backward()
    torch.testing.assert_close(grad_hidden, h.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_prompts, p.grad, atol=1e-5, rtol=0)
    assert extra == [] and all(w.grad is None and not w.requires_grad for w in stack.parameters())


def test_span_backward_returns_extra_tensor_gradients(stack):
    """Extra per-block trainables (client LoRA's seam): the context makes the blocks use them."""
    hidden, _, positions, mask = _inputs(3)
    scale = torch.tensor(1.5)
    backend = types.SimpleNamespace(stack=stack, device=torch.device("cpu"), dtype=torch.float32)
    training = TrainingBackend(backend, max_batch_size=8, max_length=64)

    class Scaled:  # multiplies the span's input by the extra scalar while active
        def __init__(self, leaves):
            self.leaves = leaves

        def __enter__(self):
            self.handle = stack.layers[0].register_forward_pre_hook(
                lambda m, args: (args[0] * self.leaves[0], *args[1:])
            )

        def __exit__(self, *exc):
            self.handle.remove()

    grad_out = torch.ones(2, 7, 64)
    _, _, (grad_scale,) = training.span_backward(0, 2, hidden, positions, mask, grad_out, None, [scale], Scaled)
    s = scale.clone().requires_grad_(True)
    handle = stack.layers[0].register_forward_pre_hook(lambda m, args: (args[0] * s, *args[1:]))
    try:
        stack(hidden, positions, mask, None, 0, (0, 2)).sum().backward()
    finally:
        handle.remove()
    torch.testing.assert_close(grad_scale, s.grad, atol=1e-4, rtol=1e-5)


def test_check_prompts_names_the_problem():
    hidden = torch.zeros(2, 5, 64)
    check_prompts(torch.zeros(4, 1, 3, 64), 4, hidden)
    check_prompts(torch.zeros(4, 2, 3, 64), 4, hidden)
    for bad in (torch.zeros(3, 1, 3, 64), torch.zeros(4, 3, 3, 64), torch.zeros(4, 1, 3, 63), torch.zeros(4, 1, 0, 64),
                torch.zeros(4, 1, 3, 64, dtype=torch.int64), torch.zeros(1, 3, 64)):  # fmt: skip
        with pytest.raises(BadRequestError, match="prompts must be floating point"):
            check_prompts(bad, 4, hidden)


def test_row_chunks(monkeypatch):
    hidden = torch.zeros(10, 6, 64)
    slices = remote_autograd._row_slices(hidden, 64 << 20)
    assert [s.stop - s.start for s in slices] == [3, 3, 3, 1]  # at least PIPELINE_CHUNKS chunks
    monkeypatch.setattr(remote_autograd, "CHUNK_TOKENS", 12)
    assert [s.stop - s.start for s in remote_autograd._row_slices(hidden, 64 << 20)] == [2] * 5
    row_bytes = 6 * 64 * 4
    assert len(remote_autograd._row_slices(hidden, 4 * row_bytes)) == 10  # one row per message


def test_kept_graph_gives_the_recomputed_gradients(stack):
    hidden, prompts, positions, mask = _inputs(4)
    grad_out = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(5))
    backend = types.SimpleNamespace(stack=stack, device=torch.device("cpu"), dtype=torch.float32)
    training = TrainingBackend(backend, max_batch_size=8, max_length=64)
    key = ("client", b"id")
    with torch.inference_mode():  # as on the compute worker
        out = training._forward(1, 5, hidden, positions, mask, prompts[1:5], key)
        assert len(training.graphs) == 1 and not out.requires_grad
        kept = training._backward(key, 1, 5, hidden, positions, mask, grad_out, prompts[1:5])
        assert len(training.graphs) == 0  # used once
        recomputed = training._backward(key, 1, 5, hidden, positions, mask, grad_out, prompts[1:5])
        # other inputs under the same key: the kept graph is not used
        training._forward(1, 5, hidden, positions, mask, prompts[1:5], key)
        other = training._backward(key, 1, 5, hidden + 1, positions, mask, grad_out, prompts[1:5])
        fresh = training._backward(None, 1, 5, hidden + 1, positions, mask, grad_out, prompts[1:5])
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(other, fresh):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_saved_graphs_are_bounded_and_expire(monkeypatch):
    from corolla.server import saved_graphs
    from corolla.server.saved_graphs import SavedGraph, SavedGraphs

    graphs = SavedGraphs(max_bytes=100, max_graphs=3, ttl=10.0)
    make = lambda n: SavedGraph((), torch.zeros(1), [], n, 0.0)  # noqa: E731
    assert not graphs.put(("a", b"big"), make(101))
    for i in range(3):
        assert graphs.put(("a", bytes([i])), make(40))
    assert len(graphs) == 2 and graphs.nbytes == 80  # the oldest made room
    assert graphs.pop(("a", b"\x00")) is None and graphs.pop(("b", b"\x02")) is None  # evicted; another client's
    for i in range(4):
        graphs.put(("c", bytes([i])), make(1))
    assert len(graphs) == 3  # at most max_graphs
    now = saved_graphs.time.monotonic()
    monkeypatch.setattr(saved_graphs.time, "monotonic", lambda: now + 11)
    assert graphs.pop(("c", b"\x03")) is None and len(graphs) == 0 and graphs.nbytes == 0


def test_kept_graph_with_extra_trainables_gives_their_gradients(stack):
    """A client's own trainables (its LoRA) in a kept graph: the backward from the graph equals recomputing."""
    hidden, _, positions, mask = _inputs(6)
    grad_out = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(7))
    backend = types.SimpleNamespace(stack=stack, device=torch.device("cpu"), dtype=torch.float32)
    training = TrainingBackend(backend, max_batch_size=8, max_length=64)
    scale = torch.tensor(0.75)

    class Scaled:  # multiplies the span's input by the extra scalar while active
        def __init__(self, leaves):
            self.leaves = leaves

        def __enter__(self):
            self.handle = stack.layers[0].register_forward_pre_hook(
                lambda m, args: (args[0] * self.leaves[0], *args[1:])
            )

        def __exit__(self, *exc):
            self.handle.remove()

    key = ("client/adapter-v1", b"id")
    with torch.inference_mode():  # as on the compute worker
        out = training._forward(0, 3, hidden, positions, mask, None, key, [scale], Scaled)
        assert len(training.graphs) == 1
        kept = training._backward(key, 0, 3, hidden, positions, mask, grad_out, None, [scale], Scaled)
        assert len(training.graphs) == 0  # used once
        recomputed = training._backward(None, 0, 3, hidden, positions, mask, grad_out, None, [scale], Scaled)
        plain = training._forward(0, 3, hidden, positions, mask, None, None, [scale], Scaled)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=0)  # the extras apply with and without a graph
    torch.testing.assert_close(kept[0], recomputed[0], atol=1e-5, rtol=0)
    assert kept[1] is None and recomputed[1] is None
    torch.testing.assert_close(kept[2][0], recomputed[2][0], atol=1e-4, rtol=1e-5)
    assert kept[2][0].abs() > 0
