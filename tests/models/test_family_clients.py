"""The families added after Llama: client classes, bf16/fp16 on CPU and refused config options.

Parity of blocks, whole models, incremental decoding and left-padded batches for every family is in
`test_parity.py` (its `checkpoint` fixture covers every config of `conftest.CONFIGS`); here the HF-compatible
client class of each new family generates through a `LocalChain` exactly as transformers does.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import CONFIGS, make_checkpoint
from transformers import AutoModelForCausalLM, BloomConfig, FalconConfig, MixtralConfig, Qwen3Config

from corolla.client.local_chain import LocalChain
from corolla.client.model import (
    AutoDistributedModelForCausalLM,
    DistributedBloomForCausalLM,
    DistributedFalconForCausalLM,
    DistributedMixtralForCausalLM,
    DistributedQwen3ForCausalLM,
)
from corolla.models import BlockStack, ClientHead, UnsupportedModelError
from corolla.models.registry import get_family

FAMILY_CONFIGS = {
    "qwen3-sliding-bias": DistributedQwen3ForCausalLM,
    "mixtral-top2-sliding": DistributedMixtralForCausalLM,
    "bloom": DistributedBloomForCausalLM,
    "falcon-new-gqa": DistributedFalconForCausalLM,
    "falcon-7b-mqa": DistributedFalconForCausalLM,
}


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def family_checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = make_checkpoint(CONFIGS[request.param](), path, seed=4)
    return request.param, str(path), model


def _left_padded(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


@torch.no_grad()
def test_client_class_generates_like_transformers(family_checkpoint):
    name, path, reference = family_checkpoint
    layers = reference.config.num_hidden_layers
    chain = LocalChain(BlockStack.load(path, 0, layers, dtype=torch.float32, progress=False))
    model = AutoDistributedModelForCausalLM.from_pretrained(path, chain=chain)
    assert type(model) is FAMILY_CONFIGS[name]
    ids, mask = _left_padded(reference.config.vocab_size)
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(ids, **options), reference.generate(ids, **options))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_transformers(family_checkpoint, dtype):
    _, path, reference = family_checkpoint
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    layers = reference.config.num_hidden_layers
    stack = BlockStack.load(path, 0, layers, dtype=dtype, progress=False)
    head = ClientHead.load(path, dtype=dtype, progress=False)
    ids = torch.randint(1, reference.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    positions, mask = torch.arange(10).expand(2, 10), torch.ones(2, 10, dtype=torch.bool)
    logits = head.logits(stack(head.embed(ids), positions, mask))
    assert logits.dtype == dtype
    expected = theirs(ids).logits.float()
    # half precision keeps ~3 significant digits; kernels (SDPA vs transformers' eager matmuls) round differently
    scale = expected.abs().max().item()
    torch.testing.assert_close(logits.float(), expected, atol=0.05 * scale, rtol=0)
    assert (logits.float().argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize(
    "config, option",
    [
        (FalconConfig(new_decoder_architecture=True, parallel_attn=False), "parallel_attn"),
        (FalconConfig(activation="swish_weird"), "swish_weird"),
        (FalconConfig(new_decoder_architecture=False, multi_query=False, num_kv_heads=2), "num_kv_heads"),
        (FalconConfig(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), "yarn"),
        (BloomConfig(pretraining_tp=2, slow_but_exact=True), "slow_but_exact"),
        (MixtralConfig(hidden_act="gelu"), "hidden_act"),
        (Qwen3Config(hidden_act="relu"), "hidden_act"),
    ],
    ids=["falcon-new-sequential", "falcon-act", "falcon-mha-kv", "falcon-yarn", "bloom-tp", "mixtral", "qwen3"],
)
def test_unsupported_options_are_refused_by_name(config, option):
    with pytest.raises(UnsupportedModelError, match=option):
        get_family(config.model_type).check_config(config)


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(
        UnsupportedModelError, match="'gpt2'.*bloom, falcon, llama, mistral, mixtral, qwen2, qwen3"
    ):
        get_family("gpt2")


@torch.no_grad()
def test_bloom_checkpoint_saved_from_the_base_model(tmp_path):
    """BLOOM's Hub checkpoints were saved from `BloomModel`: no `transformer.` prefix, no lm_head (tied)."""
    from transformers import BloomForCausalLM, BloomModel

    reference = make_checkpoint(CONFIGS["bloom"](), tmp_path / "full", seed=5)
    base = BloomModel(reference.config)
    base.load_state_dict(reference.transformer.state_dict())
    base.save_pretrained(tmp_path / "base", max_shard_size="24KB")
    assert isinstance(reference, BloomForCausalLM)
    stack = BlockStack.load(str(tmp_path / "base"), 0, 4, dtype=torch.float32, progress=False)
    head = ClientHead.load(str(tmp_path / "base"), dtype=torch.float32, progress=False)
    ids = torch.randint(1, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    positions, mask = torch.arange(8).expand(2, 8), torch.ones(2, 8, dtype=torch.bool)
    logits = head.logits(stack(head.embed(ids), positions, mask))
    torch.testing.assert_close(logits, reference(ids).logits, atol=1e-4, rtol=0)
