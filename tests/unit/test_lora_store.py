"""The server's adapter store without a network: loading rules, per-client bound, TTL, release, ownership."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from corolla.models.lora import LoraLinear, use_adapter
from corolla.models.stack import BlockStack
from corolla.server.adapters import AdapterLoadError, AdapterStore, parse_adapter_spec, read_adapter_files
from corolla.wire.errors import AdapterLimitError, BadRequestError, UnknownAdapterError
from corolla.wire.messages import LoraTensors, LoraUploadRequest, ModelRef

MODEL = ModelRef("tiny", "hash")


@pytest.fixture(scope="module")
def stack():
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return BlockStack.from_config(config, 1, 3, dtype=torch.float32)  # the store wraps it on first upload


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _upload(name="a", start=1, end=3, rank=2, replaces="", target="self_attn.q_proj", scale=2.0):
    out = 32 if target == "self_attn.q_proj" else 16
    weights = tuple(
        LoraTensors(i, target, torch.randn(rank, 32), torch.randn(out, rank)) for i in range(start, end)
    )
    return LoraUploadRequest(MODEL, name, start, end, scale, weights, replaces)


def pair_bytes(rank=2, out=32):
    return (rank * 32 + out * rank) * 4


def test_upload_use_release_and_ownership(stack):
    store = AdapterStore(stack, max_client_bytes=10_000)
    assert store.upload("peer1", _upload()) == 2 * pair_bytes()
    assert isinstance(stack.layers[0].attn.qkv, LoraLinear)
    fused = store.resolve("peer1", "a", 1, 3)
    assert set(fused) == {(1, "attn.qkv"), (2, "attn.qkv")}
    # another peer cannot use it: for it, the name is unknown
    with pytest.raises(UnknownAdapterError, match="'a' is not served here"):
        store.resolve("peer2", "a", 1, 3)
    # the fused delta changes the blocks' output only while active
    hidden = torch.randn(1, 3, 32)
    positions, mask = torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool)
    base = stack(hidden, positions, mask)
    with use_adapter(fused):
        adapted = stack(hidden, positions, mask)
    assert not torch.allclose(base, adapted)
    torch.testing.assert_close(stack(hidden, positions, mask), base)
    # a new version replaces the old one; release drops it
    store.upload("peer1", _upload("b", replaces="a"))
    with pytest.raises(UnknownAdapterError):
        store.resolve("peer1", "a", 1, 3)
    assert store.client_bytes("peer1") == 2 * pair_bytes()
    assert store.release("peer1", "b") and store.client_bytes("peer1") == 0


def test_partial_uploads_must_cover_the_request(stack):
    store = AdapterStore(stack, max_client_bytes=10_000)
    store.upload("p", _upload(start=1, end=2))
    assert store.resolve("p", "a", 1, 2) is not None
    with pytest.raises(UnknownAdapterError, match="no uploaded weights for blocks \\[2\\]"):
        store.resolve("p", "a", 1, 3)
    store.upload("p", _upload(start=2, end=3))  # adds block 2 to the same version
    assert set(store.resolve("p", "a", 1, 3)) == {(1, "attn.qkv"), (2, "attn.qkv")}


def test_bound_per_client(stack):
    store = AdapterStore(stack, max_client_bytes=3 * pair_bytes())
    store.upload("p", _upload("a"))
    with pytest.raises(AdapterLimitError, match=f"over the limit of {3 * pair_bytes()} bytes"):
        store.upload("p", _upload("b"))
    assert store.client_bytes("p") == 2 * pair_bytes()  # nothing of the refused upload is kept
    store.upload("q", _upload("b"))  # the bound is per client
    store.upload("p", _upload("a"))  # re-uploading the same blocks replaces them: no growth
    assert store.client_bytes("p") == 2 * pair_bytes()
    with pytest.raises(AdapterLimitError, match="does not accept"):
        AdapterStore(stack, max_client_bytes=0).upload("p", _upload())


def test_unused_uploads_expire(stack):
    clock = Clock()
    store = AdapterStore(stack, max_client_bytes=10_000, client_ttl=60, clock=clock)
    store.upload("p", _upload())
    clock.now = 50
    store.resolve("p", "a", 1, 3)  # use refreshes it
    clock.now = 100
    assert store.client_bytes("p") > 0
    clock.now = 161
    store.expire()
    assert store.client_bytes("p") == 0


@pytest.mark.parametrize(
    "request_args, message",
    [
        (dict(start=0, end=2), "not within this server's blocks \\[1, 3\\)"),
        (dict(target="self_attn.nope"), "no linear layer 'self_attn.nope'"),
        (dict(rank=40), "must be floating A \\[r, 32\\]"),
        (dict(scale=float("nan")), "scale must be finite"),
        (dict(name=""), "needs a name"),
    ],
)
def test_bad_uploads_are_refused(stack, request_args, message):
    store = AdapterStore(stack, max_client_bytes=1 << 20)
    with pytest.raises(BadRequestError, match=message):
        store.upload("p", _upload(**request_args))
    assert store.client_bytes("p") == 0


def test_served_adapter_files(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterLoadError, match="adapter_model.bin \\(a pickle\\).*safetensors"):
        read_adapter_files(str(tmp_path))
    with pytest.raises(AdapterLoadError, match="no adapter_config.json"):
        read_adapter_files(str(_empty_dir(tmp_path)))
    assert parse_adapter_spec("name=org/repo") == ("name", "org/repo")
    assert parse_adapter_spec("org/repo") == ("org/repo", "org/repo")


def _empty_dir(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    return path


def test_empty_and_too_many_uploads_are_refused(stack):
    from corolla.server.adapters import MAX_ADAPTERS_PER_CLIENT

    store = AdapterStore(stack, max_client_bytes=1 << 20)
    empty = LoraUploadRequest(MODEL, "e", 1, 3, 1.0, ())
    with pytest.raises(BadRequestError, match="no weights for \\[1, 2\\]"):
        store.upload("p", empty)
    for i in range(MAX_ADAPTERS_PER_CLIENT):
        store.upload("p", _upload(f"n{i}", start=1, end=2, rank=1))
    with pytest.raises(AdapterLimitError, match="release one first"):
        store.upload("p", _upload("one-more", start=1, end=2, rank=1))


def test_expiry_runs_on_its_own_on_an_event_loop(stack):
    import asyncio

    async def scenario():
        store = AdapterStore(stack, max_client_bytes=1 << 20, client_ttl=0.05)
        store.upload("p", _upload())
        assert store.client_bytes("p") > 0
        for _ in range(1200):  # the store's own timer drops it; this loop only bounds the wait
            await asyncio.sleep(0.05)
            if store.client_bytes("p") == 0:
                return True
        return False

    assert asyncio.run(scenario())
