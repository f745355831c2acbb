"""Loader tests: only the needed shards and tensors are read; errors name what is wrong; Hub ids resolve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, LlamaConfig

import corolla.models.checkpoint as checkpoint_module
from corolla.models import (
    BlockStack,
    Checkpoint,
    CheckpointError,
    ClientHead,
    UnsupportedModelError,
    config_hash,
    default_dht_prefix,
    get_family,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Recorder:
    """Wraps safetensors' `safe_open` to record which files are opened and which tensors are read."""

    def __init__(self, real):
        self.real, self.files, self.tensors = real, [], []

    def __call__(self, path, *args, **kwargs):
        self.files.append(Path(path).name)
        recorder, reader = self, self.real(path, *args, **kwargs)

        class Reader:
            def __enter__(self):
                reader.__enter__()
                return self

            def __exit__(self, *exc):
                return reader.__exit__(*exc)

            def keys(self):
                return reader.keys()

            def get_tensor(self, name):
                recorder.tensors.append(name)
                return reader.get_tensor(name)

        return Reader()


def _index(path) -> dict[str, str]:
    return json.loads((Path(path) / "model.safetensors.index.json").read_text())["weight_map"]


def _single_file_copy(model, config_folder, target: Path, edit) -> Path:
    """Write `model`'s weights as one model.safetensors after `edit(state)`, with the same config."""
    target.mkdir()
    shutil.copy(Path(config_folder) / "config.json", target / "config.json")
    state = {name: tensor.contiguous().clone() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    edit(state)
    save_file(state, str(target / "model.safetensors"))
    return target


def test_loads_only_needed_shards_and_tensors(llama_checkpoint, monkeypatch):
    path, model = llama_checkpoint
    recorder = _Recorder(checkpoint_module.safe_open)
    monkeypatch.setattr(checkpoint_module, "safe_open", recorder)
    stack = BlockStack.load(path, 2, 4, dtype=torch.float32, progress=False)
    weight_map = _index(path)
    needed = {name for name in weight_map if name.startswith(("model.layers.2.", "model.layers.3."))}
    assert sorted(recorder.tensors) == sorted(needed)
    assert set(recorder.files) == {weight_map[name] for name in needed}
    assert set(recorder.files) < set(weight_map.values()), "the fixture should have shards we do not need"
    assert (stack.start, stack.end, len(stack.layers)) == (2, 4, 2)


def test_client_head_reads_only_client_tensors(llama_checkpoint, monkeypatch):
    path, model = llama_checkpoint
    recorder = _Recorder(checkpoint_module.safe_open)
    monkeypatch.setattr(checkpoint_module, "safe_open", recorder)
    head = ClientHead.load(path, dtype=torch.float32, progress=False)
    assert model.config.tie_word_embeddings and head.lm_head is None
    assert sorted(recorder.tensors) == ["model.embed_tokens.weight", "model.norm.weight"]


def test_missing_tensor_is_named(llama_checkpoint, tmp_path):
    path, _ = llama_checkpoint
    target = tmp_path / "ckpt"
    shutil.copytree(path, target)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        BlockStack.load(str(target), 2, 4, dtype=torch.float32, progress=False)
    BlockStack.load(str(target), 0, 2, dtype=torch.float32, progress=False)  # other blocks still load


def test_wrong_shape_is_named(llama_checkpoint, tmp_path):
    path, model = llama_checkpoint

    def shrink(state):
        state["model.layers.3.self_attn.k_proj.weight"] = state["model.layers.3.self_attn.k_proj.weight"][:-1]

    target = _single_file_copy(model, path, tmp_path / "ckpt", shrink)
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.self_attn\.k_proj\.weight has shape"):
        BlockStack.load(str(target), 2, 4, dtype=torch.float32, progress=False)


def test_unexpected_tensor_is_named_and_rotary_buffers_are_ignored(llama_checkpoint, tmp_path):
    path, model = llama_checkpoint

    def add_extra(state):
        state["model.layers.2.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        state["model.layers.3.self_attn.q_norm.weight"] = torch.ones(16)

    target = _single_file_copy(model, path, tmp_path / "ckpt", add_extra)
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.self_attn\.q_norm\.weight") as error:
        BlockStack.load(str(target), 2, 4, dtype=torch.float32, progress=False)
    assert "inv_freq" not in str(error.value)
    BlockStack.load(str(target), 0, 2, dtype=torch.float32, progress=False)


def test_single_file_checkpoint_and_dtype_cast(llama_checkpoint, tmp_path):
    path, model = llama_checkpoint
    target = _single_file_copy(model, path, tmp_path / "ckpt", lambda state: None)
    stack = BlockStack.load(str(target), 1, 3, dtype=torch.bfloat16, progress=False)
    assert {p.dtype for p in stack.parameters()} == {torch.bfloat16}
    reference = model.model.layers[1].self_attn.k_proj.weight.to(torch.bfloat16)
    kv_rows = reference.shape[0]
    q_rows = model.config.num_attention_heads * model.config.head_dim
    assert torch.equal(stack.layers[0].attn.qkv.weight[q_rows : q_rows + kv_rows], reference)


def test_hub_repo_id_resolves_offline_from_cache(llama_checkpoint, tmp_path, monkeypatch):
    path, _ = llama_checkpoint
    repo = tmp_path / "hub" / "models--org--tiny.llama"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    weight_map = _index(path)
    needed = {weight_map[n] for n in weight_map if n.startswith(("model.layers.2.", "model.layers.3."))}
    for name in ["config.json", "model.safetensors.index.json", *needed]:  # only the shards blocks 2..3 need
        shutil.copy(Path(path) / name, snapshot / name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    stack = BlockStack.load("org/tiny.llama", 2, 4, dtype=torch.float32, progress=False)
    local = BlockStack.load(path, 2, 4, dtype=torch.float32, progress=False)
    for ours, theirs in zip(stack.state_dict().values(), local.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs)
    assert config_hash(stack.config) == config_hash(local.config)
    BlockStack.load("org/tiny.llama", 2, 4, dtype=torch.float32, revision=COMMIT, progress=False)
    with pytest.raises(CheckpointError, match="offline"):  # the embeddings' shard is not cached
        ClientHead.load("org/tiny.llama", dtype=torch.float32, progress=False)


def test_missing_local_folder_is_clear():
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint("/nonexistent/folder/model")


def test_config_hash_ignores_volatile_keys():
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48)
    base = config_hash(config)
    config._name_or_path = "/somewhere/else"
    config.use_cache = not config.use_cache
    config.transformers_version = "0.0.1"
    config.dtype = torch.bfloat16
    assert config_hash(config) == base
    data = config.to_dict()
    data.update({"torch_dtype": "float16", "_attn_implementation_autoset": True, "_commit_hash": "abc"})
    assert config_hash(data) == base
    assert config_hash({**data, "architectures": ["Other"]}) != base
    changed = LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=3, intermediate_size=48)
    assert config_hash(changed) != base


def test_config_hash_survives_save_and_reload(tmp_path):
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48)
    config.save_pretrained(tmp_path)
    first, second = AutoConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)
    assert config_hash(first) == config_hash(second)
    assert len(config_hash(first)) == 64


@pytest.mark.parametrize(
    ("ref", "prefix"),
    [
        ("meta-llama/Llama-3.1-8B", "Llama-3-1-8B"),
        ("/models/tiny.llama/", "tiny-llama"),
        ("relative/dir//", "dir"),
        ("bigscience/bloom", "bloom"),
    ],
)
def test_default_dht_prefix(ref, prefix):
    assert default_dht_prefix(ref) == prefix


def test_unsupported_model_type_lists_supported(tmp_path):
    with pytest.raises(UnsupportedModelError, match="gpt2") as error:
        get_family("gpt2")
    assert all(name in str(error.value) for name in ("llama", "mistral", "qwen2"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UnsupportedModelError, match="mamba"):
        BlockStack.load(str(tmp_path), 0, 1, dtype=torch.float32, progress=False)
