"""LoRA on our fused blocks against PEFT on the transformers model: outputs, gradients, saved files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import CONFIGS, make_checkpoint

from corolla.models import BlockStack, ClientHead
from corolla.models.lora import (
    LoraError,
    attach_lora,
    fuse_adapter,
    fuse_weights,
    lora_sites,
    parse_peft_adapter,
    use_adapter,
)

ATOL = 1e-4
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", params=["llama-gqa-headdim-llama3-tied", "llama-mqa-linear-bias"])
def base(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = make_checkpoint(CONFIGS[request.param](), path)
    stack = BlockStack.load(str(path), 0, model.config.num_hidden_layers, dtype=torch.float32, progress=False)
    attach_lora(stack)
    head = ClientHead.load(str(path), dtype=torch.float32, progress=False)
    return str(path), model, stack, head


def make_peft(model, tmp_path, *, targets=ALL_TARGETS, r=4, alpha=8, rslora=False, seed=0):
    """A PEFT LoRA with random A and B on a copy of `model`, saved as safetensors: (peft model, folder)."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path, safe_serialization=True)
    return peft_model, tmp_path


def read_adapter(folder, stack, **kwargs):
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    return parse_peft_adapter(config, tensors, stack.family, stack.config, **kwargs)


def logits(stack, head, ids, fused=None):
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with use_adapter(fused):
        return head.logits(stack(head.embed(ids), positions, mask))


def _ids(model, batch=2, length=9):
    return torch.randint(1, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    "options",
    [{}, {"targets": ["q_proj", "v_proj"], "rslora": True, "r": 3}, {"targets": ["k_proj", "up_proj", "o_proj"]}],
    ids=["all", "qv-rslora", "k-up-o"],
)
@torch.no_grad()
def test_matches_peft_and_merged(base, tmp_path, options):
    path, model, stack, head = base
    peft_model, folder = make_peft(model, tmp_path, **options)
    adapter = read_adapter(folder, stack)
    ids = _ids(model)
    ours = logits(stack, head, ids, fuse_adapter(adapter, stack.family, stack.config))
    torch.testing.assert_close(ours, peft_model(ids).logits, atol=ATOL, rtol=0)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    torch.testing.assert_close(ours, merged(ids).logits, atol=ATOL, rtol=0)
    # the base path is untouched, with or without the wrappers
    torch.testing.assert_close(logits(stack, head, ids), model(ids).logits, atol=ATOL, rtol=0)
    assert not torch.allclose(ours, model(ids).logits, atol=1e-3)


def test_gradients_match_peft(base, tmp_path):
    path, model, stack, head = base
    peft_model, folder = make_peft(model, tmp_path)
    adapter = read_adapter(folder, stack)
    ids = _ids(model)
    labels = torch.roll(ids, -1, dims=1)

    weights = {
        block: {name: (a.clone().requires_grad_(), b.clone().requires_grad_()) for name, (a, b) in pairs.items()}
        for block, pairs in adapter.weights.items()
    }
    out = logits(stack, head, ids, fuse_weights(weights, adapter.scale, stack.family, stack.config))
    torch.nn.functional.cross_entropy(out.flatten(0, 1), labels.flatten()).backward()

    ref = peft_model(ids).logits
    torch.nn.functional.cross_entropy(ref.flatten(0, 1), labels.flatten()).backward()
    prefix = stack.family.prefix
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert len(grads) == 2 * sum(len(p) for p in weights.values())
    # the fused and PEFT's separate projections sum in different orders: fp32 rounding differs by ~1e-5 on
    # gradients of ~0.05, while a wrong gradient differs by about its own size
    for block, pairs in weights.items():
        for name, (a, b) in pairs.items():
            key = f"base_model.model.{prefix(block)}{name}"
            torch.testing.assert_close(a.grad, grads[f"{key}.lora_A.default.weight"], atol=ATOL, rtol=1e-3)
            torch.testing.assert_close(b.grad, grads[f"{key}.lora_B.default.weight"], atol=ATOL, rtol=1e-3)


def test_blocks_subset_and_roundtrip(base, tmp_path):
    path, model, stack, head = base
    peft_model, folder = make_peft(model, tmp_path, targets=["q_proj", "down_proj"])
    part = read_adapter(folder, stack, blocks=(1, 3))
    assert sorted(part.weights) == [1, 2]
    full = read_adapter(folder, stack)
    assert full.blocks(1, 3).weights.keys() == part.weights.keys()
    # our PEFT export loads in PEFT and gives the same logits
    out = tmp_path / "export"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(full.peft_config(path)))
    save_file(full.peft_tensors(stack.family), out / "adapter_model.safetensors")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model), out).eval()
    ids = _ids(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, peft_model(ids).logits, atol=1e-6, rtol=0)


def test_sites_cover_fused_modules(base):
    _, _, stack, _ = base
    sites = lora_sites(stack.family, stack.specs[0])
    assert sorted(s.rsplit(".", 1)[-1] for s in sites) == sorted(ALL_TARGETS)
    layer = stack.layers[0]
    for module in {s.module for s in sites.values()}:
        covered = sorted((s.start, s.stop) for s in sites.values() if s.module == module)
        assert covered[0][0] == 0 and covered[-1][1] == layer.get_submodule(module).out_features
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


def test_bad_adapters_are_refused(base, tmp_path):
    _, model, stack, _ = base
    _, folder = make_peft(model, tmp_path, targets=["q_proj"])
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")

    def parse(config=config, tensors=tensors):
        return parse_peft_adapter(config, tensors, stack.family, stack.config)

    with pytest.raises(LoraError, match="DoRA"):
        parse({**config, "use_dora": True})
    with pytest.raises(LoraError, match="embed_tokens"):
        parse({**config, "target_modules": ["q_proj", "embed_tokens"]})
    with pytest.raises(LoraError, match="peft_type"):
        parse({**config, "peft_type": "IA3"})
    key = next(k for k in tensors if "lora_A" in k)
    with pytest.raises(LoraError, match="do not fit"):
        parse(tensors={**tensors, key: torch.zeros(4, 5)})
    with pytest.raises(LoraError, match="not its pair"):
        parse(tensors={k: v for k, v in tensors.items() if k != key})
    with pytest.raises(LoraError, match="block 99"):
        parse(tensors={**tensors, key.replace("layers.0.", "layers.99."): tensors[key]})
    with pytest.raises(LoraError, match="not a LoRA weight"):
        parse(tensors={**tensors, "base_model.model.lm_head.lora_A.weight": tensors[key]})


@pytest.mark.parametrize(
    "config, targets",
    [
        ("qwen3-sliding-bias", ALL_TARGETS),
        ("bloom", ["dense", "dense_h_to_4h", "dense_4h_to_h"]),
        # fused q/k/v whose rows corolla reorders at load (PEFT's default target for BLOOM and Falcon)
        ("bloom", ["query_key_value"]),
        ("bloom-6heads-postln-residual", ["query_key_value", "dense_4h_to_h"]),
        ("falcon-new-gqa", ["query_key_value", "dense"]),
        ("falcon-7b-mqa", ["query_key_value"]),
        ("falcon-sequential-mha-bias", ["query_key_value", "dense_h_to_4h"]),
    ],
)
@torch.no_grad()
def test_other_families_match_peft(tmp_path, config, targets):
    model = make_checkpoint(CONFIGS[config](), tmp_path / "ckpt")
    stack = BlockStack.load(str(tmp_path / "ckpt"), 0, model.config.num_hidden_layers, dtype=torch.float32)
    attach_lora(stack)
    head = ClientHead.load(str(tmp_path / "ckpt"), dtype=torch.float32, progress=False)
    peft_model, folder = make_peft(model, tmp_path / "adapter", targets=targets)
    adapter = read_adapter(folder, stack)
    ids = _ids(model)
    ours = logits(stack, head, ids, fuse_adapter(adapter, stack.family, stack.config))
    torch.testing.assert_close(ours, peft_model(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_lora_wraps_quantized_linears(tmp_path, quant_type):
    """LoRA calls whatever module holds the base weights (never reads a weight): quantized ones too."""
    from corolla.models.quant import quantize_stack

    model = make_checkpoint(CONFIGS["llama-gqa-headdim-llama3-tied"](), tmp_path / "ckpt")
    path = str(tmp_path / "ckpt")
    stack = BlockStack.load(path, 0, model.config.num_hidden_layers, dtype=torch.float32, progress=False)
    quantize_stack(stack, quant_type)
    attach_lora(stack)
    assert type(stack.layers[0].attn.qkv.base).__name__ != "Linear"
    head = ClientHead.load(path, dtype=torch.float32, progress=False)
    peft_model, folder = make_peft(model, tmp_path / "adapter")
    adapter = read_adapter(folder, stack)
    ids = _ids(model)
    with torch.no_grad():
        quantized_delta = logits(stack, head, ids, fuse_adapter(adapter, stack.family, stack.config)) - logits(
            stack, head, ids
        )
        exact_delta = peft_model(ids).logits - model(ids).logits
    # the LoRA delta on top of quantized blocks is the exact delta up to the quantization error (a missing
    # or misplaced LoRA would be off by about 1)
    error = (quantized_delta - exact_delta).abs().max() / exact_delta.abs().max()
    assert error < {"int8": 0.2, "nf4": 0.5}[quant_type], error
    # module level, exactly: the wrapper adds scale * B(A(x)) to what the quantized module returns
    wrapper, fused = stack.layers[1].attn.qkv, fuse_adapter(adapter, stack.family, stack.config)
    x = torch.randn(5, wrapper.in_features)
    a, b = fused[(1, "attn.qkv")]
    with torch.no_grad(), use_adapter(fused):
        torch.testing.assert_close(wrapper(x), wrapper.base(x) + (x @ a.t()) @ b.t())
    # and gradients reach A and B through the quantized base
    weights = {b: {n: (a.clone().requires_grad_(), bb.clone().requires_grad_()) for n, (a, bb) in p.items()}
               for b, p in adapter.weights.items()}  # fmt: skip
    logits(stack, head, ids, fuse_weights(weights, adapter.scale, stack.family, stack.config)).sum().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for p in weights.values() for a, _ in p.values())
