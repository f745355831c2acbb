"""Layer- and API-level tests that need no checkpoint: rope settings, cache API, masks, dtypes, validation."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from corolla.models import BlockStack, ClientHead, UnsupportedModelError
from corolla.models.layers import _visible, attention_masks, rope_parameters


def _config(**overrides) -> LlamaConfig:
    settings = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }
    return LlamaConfig(**{**settings, **overrides})


def test_rope_parameters_new_and_old_style():
    new = SimpleNamespace(rope_parameters={"rope_type": "linear", "rope_theta": 5.0, "factor": 2.0})
    old = SimpleNamespace(
        rope_theta=5.0, rope_scaling={"type": "linear", "factor": 2.0}, max_position_embeddings=8
    )
    plain = SimpleNamespace(rope_theta=7.0, rope_scaling=None, max_position_embeddings=8)
    assert rope_parameters(new)["rope_type"] == rope_parameters(old)["rope_type"] == "linear"
    assert rope_parameters(old)["rope_theta"] == 5.0
    assert rope_parameters(plain) == {"rope_theta": 7.0, "rope_type": "default"}
    llama3 = SimpleNamespace(
        rope_theta=5.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        max_position_embeddings=32,
    )
    assert rope_parameters(llama3)["original_max_position_embeddings"] == 32


def test_unsupported_rope_type_is_named():
    config = SimpleNamespace(rope_parameters={"rope_type": "yarn", "rope_theta": 5.0, "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        rope_parameters(config)


def test_cache_api_shapes_and_bytes():
    stack = BlockStack.from_config(_config(), 1, 3, dtype=torch.bfloat16)
    assert stack.kv_cache_shape(batch=3, max_length=10) == (3, 2, 10, 16)
    assert stack.cache_bytes_per_token() == 2 * 2 * 16 * 2
    caches = stack.allocate_cache(3, 10, blocks=(2, 3))
    assert len(caches) == 1 and caches[0].k.shape == (3, 2, 10, 16) and caches[0].k.dtype == torch.bfloat16
    assert caches[0].nbytes == 10 * stack.cache_bytes_per_token() * 3
    assert len(stack.allocate_cache(1, 4)) == 2


@torch.no_grad()
def test_sub_range_runs_match_whole_run_with_cache():
    torch.manual_seed(0)
    stack = BlockStack.from_config(_config(), 0, 4, dtype=torch.float32)
    hidden = torch.randn(2, 5, 32)
    positions = torch.arange(5).expand(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    whole = stack(hidden, positions, mask, stack.allocate_cache(2, 8), offset=0)
    first = stack(hidden, positions, mask, stack.allocate_cache(2, 8, blocks=(0, 1)), blocks=(0, 1))
    rest = stack(first, positions, mask, stack.allocate_cache(2, 8, blocks=(1, 4)), blocks=(1, 4))
    torch.testing.assert_close(rest, whole)


@torch.no_grad()
def test_fully_padded_rows_stay_finite():
    stack = BlockStack.from_config(_config(), 0, 2, dtype=torch.float32)
    mask = torch.tensor([[False, False, True], [False, False, False]])
    out = stack(torch.randn(2, 3, 32), torch.zeros(2, 3, dtype=torch.long), mask)
    assert torch.isfinite(out).all()


def test_masks_are_causal_padded_windowed_and_see_themselves():
    mask = torch.tensor([[False, True, True, True, True]])
    masks = attention_masks(mask, offset=3, length=2, windows={None, 2}, n_rep=2)
    full, window = masks[None], masks[2]
    assert full.shape == (1, 1, 4, 5)
    assert full[0, 0, 0].tolist() == [False, True, True, True, False]
    assert full[0, 0, 1].tolist() == [False, True, True, True, True]
    assert torch.equal(full[0, 0, 2:], full[0, 0, :2])  # second query head of the group
    assert window[0, 0, 0].tolist() == [False, False, True, True, False]
    own = attention_masks(torch.zeros(1, 2, dtype=torch.bool), offset=0, length=2, windows={None}, n_rep=1)
    assert own[None][0, 0].tolist() == [[True, False], [False, True]]


def test_one_token_fast_path_matches_general_masks():
    generator = torch.Generator().manual_seed(0)
    for keys in (1, 2, 5, 9):
        valid = torch.rand(3, keys, generator=generator) > 0.4
        for window in (None, 2, keys):
            fast = attention_masks(valid, keys - 1, 1, {window}, n_rep=2)[window]
            general = _visible(valid, keys - 1, 1, window)[:, None]
            assert torch.equal(fast.expand(3, 1, 1, keys), general), (keys, window)
            additive = attention_masks(valid, keys - 1, 1, {window}, n_rep=2, dtype=torch.float32)[window]
            assert torch.equal(additive == 0, fast)


@torch.no_grad()
def test_bfloat16_stays_close_to_float32():
    torch.manual_seed(0)
    config = _config()
    stack32 = BlockStack.from_config(config, 0, 4, dtype=torch.float32)
    stack16 = BlockStack.from_config(config, 0, 4, dtype=torch.bfloat16)
    stack16.load_state_dict({k: v.to(torch.bfloat16) for k, v in stack32.state_dict().items()})
    hidden = torch.randn(1, 6, 32)
    positions, mask = torch.arange(6)[None], torch.ones(1, 6, dtype=torch.bool)
    out32 = stack32(hidden, positions, mask)
    out16 = stack16(hidden.to(torch.bfloat16), positions, mask)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, atol=0.1, rtol=0.05)


def test_forward_validates_its_inputs():
    stack = BlockStack.from_config(_config(), 0, 2, dtype=torch.float32)
    hidden, positions = torch.zeros(1, 2, 32), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask"):
        stack(hidden, positions, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="offset"):
        stack(hidden, positions, torch.ones(1, 4, dtype=torch.bool), offset=2)
    with pytest.raises(ValueError, match="cannot take"):
        stack(hidden, positions, torch.ones(1, 4, dtype=torch.bool), stack.allocate_cache(1, 3), offset=2)
    with pytest.raises(ValueError, match="sub-range"):
        stack(hidden, positions, torch.ones(1, 2, dtype=torch.bool), blocks=(1, 3))
    with pytest.raises(ValueError, match="block range"):
        BlockStack.from_config(_config(), 3, 5, dtype=torch.float32)


def test_client_head_from_config_tied_and_untied():
    tied = ClientHead.from_config(_config(tie_word_embeddings=True), dtype=torch.float32)
    untied = ClientHead.from_config(_config(tie_word_embeddings=False), dtype=torch.float32)
    assert tied.lm_head is None and untied.lm_head is not None
    hidden = tied.embed(torch.tensor([[1, 2, 3]]))
    assert hidden.shape == (1, 3, 32) and tied.logits(hidden).shape == (1, 3, 64)


def test_models_package_imports_no_network_layers():
    """What `import corolla.models` adds to `import corolla` holds no hivemind, wire, swarm, server or client."""
    code = (
        "import sys, corolla\n"
        "before = set(sys.modules)\n"
        "import corolla.models\n"
        "forbidden = ('hivemind', 'corolla.wire', 'corolla.swarm', 'corolla.server', 'corolla.client')\n"
        "bad = sorted(m for m in set(sys.modules) - before if m == 'hivemind' or m.startswith(forbidden))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
