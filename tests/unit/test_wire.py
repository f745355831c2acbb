"""Wire round-trips and limits: typed messages, tensors of every dtype, compression, and rejection of
anything malformed or oversized (nothing is unpickled or evaluated)."""

from __future__ import annotations

import asyncio
import dataclasses

import msgpack
import pytest
import torch

from corolla.wire.codec import pack, unpack
from corolla.wire.errors import BadRequestError, CacheFullError, ServerRefusedError, error_from_code
from corolla.wire.framing import HEADER, encode_frame, read_message
from corolla.wire.messages import ForwardRequest, InferenceStep, Kind, ModelRef
from corolla.wire.records import WIRE_VERSION, ServerInfo, ServerState
from corolla.wire.tensors import DTYPES, decode_tensor, encode_tensor

MODEL = ModelRef("tiny", "ab" * 32)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_tensor_round_trip_every_dtype(dtype):
    t = (torch.randn(2, 3, 5) * 10).to(DTYPES[dtype])
    back = decode_tensor(encode_tensor(t), max_bytes=1 << 20)
    assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)


@pytest.mark.parametrize("compression", ["float16", "bfloat16"])
def test_float_compression_declares_and_restores_dtype(compression):
    t = torch.randn(4, 16)
    obj = encode_tensor(t, compression)
    assert obj[0] == "float32" and obj[2] == compression and len(obj[3]) == t.numel() * 2
    back = decode_tensor(obj, max_bytes=1 << 20)
    assert back.dtype == torch.float32
    assert torch.allclose(back, t, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rowwise_compression(dtype):
    """Four times fewer bytes than float32; each value within half a step (its row's absmax / 254)."""
    x = (torch.randn(3, 7, 64) * torch.logspace(-2, 2, 7)[None, :, None]).to(dtype)  # rows of very unequal scale
    obj = encode_tensor(x, "int8_rowwise")
    assert obj[:3] == [str(dtype).removeprefix("torch."), [3, 7, 64], "int8_rowwise"]
    assert len(obj[3]) == x.numel() + 4 * 21
    y = decode_tensor(obj, 1 << 20)
    assert y.dtype == dtype and y.shape == x.shape
    step = x.float().abs().amax(-1, keepdim=True) / 254
    rounding = x.float().abs() * 2**-8 if dtype == torch.bfloat16 else 0.0  # bfloat16's own rounding of the result
    assert bool(((y.float() - x.float()).abs() <= step * 1.01 + rounding).all())
    # integers and empty tensors travel as they are
    assert encode_tensor(torch.arange(4), "int8_rowwise")[2] == "int64"
    assert encode_tensor(torch.empty(0, 64), "int8_rowwise")[2] == "float32"


@pytest.mark.parametrize(
    "mutate,text",
    [
        (lambda o: [o[0], o[1], o[2], o[3][:-1]], "needs"),
        (lambda o: [o[0], o[1], o[2], o[3][:-4] + b"\x00\x00\xc0\x7f"], "finite and positive"),  # a NaN scale
        (lambda o: [o[0], o[1], o[2], o[3][:-4] + b"\x00\x00\x80\xbf"], "finite and positive"),  # -1.0
        (lambda o: ["int64", o[1], o[2], o[3]], "floating"),
        (lambda o: [o[0], [], o[2], o[3]], "rank"),
    ],
)
def test_malformed_int8_rowwise_is_rejected(mutate, text):
    obj = encode_tensor(torch.randn(2, 8), "int8_rowwise")
    with pytest.raises(BadRequestError, match=text):
        decode_tensor(mutate(obj), 1 << 20)


def test_empty_and_noncontiguous_tensors():
    assert decode_tensor(encode_tensor(torch.empty(0, 4)), 100).shape == (0, 4)
    t = torch.randn(4, 6).t()
    assert torch.equal(decode_tensor(encode_tensor(t), 1000), t)


@pytest.mark.parametrize(
    "obj, text",
    [
        (["float32", [2], "float32", b"\x00" * 7], "needs 8 bytes"),
        (["float99", [2], "float99", b""], "unknown tensor dtype"),
        (["int64", [2], "float16", b"\x00" * 4], "cannot travel as"),
        (["float32", [-1], "float32", b""], "non-negative"),
        (["float32", [1] * 9, "float32", b"\x00" * 4], "at most 8"),
        (["float32", [1 << 20], "float32", b""], "exceeds the limit"),
        ("nope", "must be"),
    ],
)
def test_malformed_tensors_are_rejected(obj, text):
    with pytest.raises(BadRequestError, match=text):
        decode_tensor(obj, max_bytes=1 << 16)


def test_message_round_trip():
    msg = ForwardRequest(MODEL, 1, 3, torch.randn(1, 2, 8), torch.tensor([[0, 1]]), torch.tensor([[True, False]]))
    back = unpack(ForwardRequest, pack(msg), 1 << 20)
    assert back.model == MODEL and (back.start, back.end) == (1, 3)
    assert torch.equal(back.hidden, msg.hidden) and torch.equal(back.attention_mask, msg.attention_mask)


def test_server_info_round_trip():
    info = ServerInfo(ServerState.ONLINE, 2, 5, public_name="x", throughput=3.5, adapters=("a", "b"),
                      next_rtts=(("peer", 0.01),), config_hash="h")  # fmt: skip
    assert unpack(ServerInfo, pack(info), 0) == info


@pytest.mark.parametrize(
    "obj, text",
    [
        ([["tiny", "h"], 1, 3], "expected 7 fields"),
        ([["tiny", "h"], "1", 3, None, None, None, ""], "ForwardRequest.start: expected int"),
        ([["tiny", 5], 1, 3, None, None, None, ""], "ForwardRequest.model.config_hash"),
        ([["tiny", "h"], True, 3, None, None, None, ""], "expected int, got bool"),
        ({"a": 1}, "malformed"),  # maps are refused outright
    ],
)
def test_fields_are_type_checked(obj, text):
    with pytest.raises(BadRequestError, match=text):
        unpack(ForwardRequest, msgpack.packb(obj), 1 << 20)


def test_unknown_enum_and_garbage():
    with pytest.raises(BadRequestError, match="unknown value"):
        fields = len(dataclasses.fields(ServerInfo))
        unpack(ServerInfo, msgpack.packb(["dead", 0, 1] + [None] * (fields - 3)), 0)
    with pytest.raises(BadRequestError, match="malformed"):
        unpack(ForwardRequest, b"\xc1\xc1", 100)
    with pytest.raises(BadRequestError):  # msgpack ext types (the only "object" hook) are refused
        unpack(ForwardRequest, msgpack.packb(msgpack.ExtType(1, b"x")), 100)


def _read(data: bytes, max_bytes: int = 1 << 20):
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_message(reader, max_bytes)

    return asyncio.run(go())


def test_frames_round_trip_and_limits():
    step = InferenceStep(4, torch.randn(1, 1, 8), torch.tensor([[4]]), torch.tensor([[True]]))
    back = _read(encode_frame(step))
    assert back.offset == 4 and torch.equal(back.hidden, step.hidden)
    with pytest.raises(BadRequestError, match="over the 10-byte limit"):
        _read(encode_frame(step), max_bytes=10)
    with pytest.raises(ServerRefusedError, match="wire version 7"):
        _read(encode_frame(step, version=7))
    with pytest.raises(BadRequestError, match="unknown message kind"):
        _read(HEADER.pack(0, WIRE_VERSION, 99))
    with pytest.raises(asyncio.IncompleteReadError):
        _read(encode_frame(step)[:-3])
    assert Kind.INFERENCE_STEP == encode_frame(step)[6]


def test_error_codes_map_to_classes():
    err = error_from_code("cache_full", "full", "peerX")
    assert isinstance(err, CacheFullError) and "peerX" in str(err) and err.message == "full"
    assert type(error_from_code("no-such-code", "x")).__name__ == "RemoteError"
