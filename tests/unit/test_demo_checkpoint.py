"""The offline demo checkpoint: loadable, sharded, chat-ready, cached, and deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from corolla.cli.demo_checkpoint import DEMO_FOLDER_NAME, default_cache_root, ensure_demo_checkpoint

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_checkpoint(tmp_path_factory.mktemp("cache"))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_lands_in_cache_dir_and_loads(checkpoint: Path) -> None:
    assert checkpoint.name == DEMO_FOLDER_NAME and checkpoint.is_dir()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers) == (128, 4)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.vocab_size == len(tokenizer)
    assert 1000 <= config.vocab_size <= 2000
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert tokenizer.unk_token is not None
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    assert generation["pad_token_id"] == tokenizer.pad_token_id


def test_is_sharded_with_index(checkpoint: Path) -> None:
    index = json.loads((checkpoint / INDEX).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert all((checkpoint / shard).is_file() for shard in shards)
    weights = _weights(checkpoint)
    assert set(weights) == set(index["weight_map"])
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_chat_template_renders_conversation(checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Tell me a story."},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith(tokenizer.bos_token)
    assert text.endswith("<|assistant|>\n")
    assert text.index("Be brief.") < text.index("Hello there") < text.index("Hi!") < text.index("a story")
    assert tokenizer.apply_chat_template(messages, tokenize=False).endswith("Tell me a story.</s>\n")

    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(tokenizer.eos_token_id) == len(messages)


def test_encode_decode_round_trip(checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    sentence = "The swarm passes each word along, like a letter between friends: naïve café 🌼 #42!"
    ids = tokenizer(sentence)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) < len(sentence.encode())  # merges were learned
    assert tokenizer.decode(ids, skip_special_tokens=True) == sentence


def test_second_call_reuses_cache(checkpoint: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}
    assert ensure_demo_checkpoint(checkpoint.parent) == checkpoint
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()} == before
    assert not [p for p in checkpoint.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_incomplete_folder_is_rebuilt_identically(checkpoint: Path, tmp_path: Path) -> None:
    # A crashed build left a folder with no completion marker: it must be replaced, not trusted.
    leftover = tmp_path / DEMO_FOLDER_NAME
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    rng_before = torch.random.get_rng_state()

    rebuilt = ensure_demo_checkpoint(tmp_path)

    assert rebuilt == leftover
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    assert (rebuilt / INDEX).is_file()
    assert (rebuilt / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    ours, theirs = _weights(rebuilt), _weights(checkpoint)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEMO_FOLDER_NAME]


def test_default_cache_root_respects_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("COROLLA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "corolla"
    monkeypatch.setenv("COROLLA_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_root() == tmp_path / "mine"
    monkeypatch.delenv("COROLLA_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_root() == tmp_path / "home" / ".cache" / "corolla"
