"""GGUF files of each supported layout (llama, also Mistral's files; qwen2; qwen3), written here from tiny
random transformers models the way llama.cpp's converter writes them (q/k rows interleaved per head for
llama), and read back by corolla: tensors exact with transformers' own GGUF loading, logits equal."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from corolla import AutoDistributedModelForCausalLM
from corolla.client.local_chain import LocalChain
from corolla.models.checkpoint import Checkpoint
from corolla.models.stack import BlockStack

_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}  # fmt: skip
COMMON = dict(
    vocab_size=96, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-6
)
LAYOUTS = {
    "llama": lambda: LlamaConfig(**COMMON, hidden_size=32, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": lambda: Qwen2Config(**COMMON, hidden_size=32, num_attention_heads=4, num_key_value_heads=2),
    # transformers reads a qwen3 GGUF with Qwen3's head_dim of 128, as every Qwen3 has
    "qwen3": lambda: Qwen3Config(
        **COMMON, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=128
    ),
}


def _interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter's permutation of q/k rows (its rotary code pairs adjacent dims)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(model, arch: str, path) -> None:
    from gguf import GGUFWriter

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    for name, tensor in model.state_dict().items():
        tensor = tensor.float()
        if name == "lm_head.weight":
            if config.tie_word_embeddings:
                continue
            gguf_name = "output.weight"
        elif name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            _, _, index, rest = name.split(".", 3)
            gguf_name = f"blk.{index}.{_TO_GGUF[rest]}"
            if arch == "llama" and rest.startswith("self_attn.q_proj"):
                tensor = _interleave(tensor, config.num_attention_heads)
            elif arch == "llama" and rest.startswith("self_attn.k_proj"):
                tensor = _interleave(tensor, config.num_key_value_heads)
        writer.add_tensor(gguf_name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", sorted(LAYOUTS))
def test_each_layout_reads_like_transformers(arch, tmp_path):
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(LAYOUTS[arch]()).eval()
    with torch.no_grad():
        for parameter in original.parameters():
            parameter.normal_(0, 0.3)
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(original, arch, path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()

    checkpoint = Checkpoint(str(path))
    tensors = checkpoint.load_tensors(list(checkpoint.weight_map), dtype=torch.float32, progress=False)
    state = reference.state_dict()
    assert all(torch.equal(tensors[name], state[name]) for name in tensors)
    assert all(torch.equal(tensors[name], original.state_dict()[name]) for name in tensors)

    stack = BlockStack.load(str(path), 0, 2, dtype=torch.float32, progress=False)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), chain=LocalChain(stack))
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)
    assert torch.equal(
        model.generate(ids, max_new_tokens=8, do_sample=False),
        reference.generate(ids, max_new_tokens=8, do_sample=False),
    )
