"""Property-based tests of every message's decoding (hypothesis): random and mutated frames either decode to
a valid message or raise BadRequestError / ServerRefusedError, never another exception, and what decoding
builds stays bounded by the frame's size plus a constant.

Valid messages are drawn from the dataclasses' own annotations (every kind of :data:`MESSAGE_CLASSES`), then
broken one way each: a field replaced by another msgpack value, bytes flipped, the frame truncated, the header's
length, version or kind changed, random or deeply nested msgpack as the payload."""

from __future__ import annotations

import asyncio
import tracemalloc

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire_strategies import messages, msgpack_values

from corolla.wire.codec import MAX_ITEMS, pack, to_obj, unpack
from corolla.wire.errors import BadRequestError, ServerRefusedError
from corolla.wire.framing import HEADER, encode_frame, read_message
from corolla.wire.messages import KINDS, MESSAGE_CLASSES, ForwardRequest, PingResponse
from corolla.wire.records import WIRE_VERSION
from corolla.wire.tensors import decode_tensor

MAX_BYTES = 1 << 20  # the decoder's frame and tensor limit in these tests
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_decodes_or_refuses(cls: type, payload: bytes) -> None:
    try:
        message = unpack(cls, payload, MAX_BYTES)
    except BadRequestError:
        return
    assert isinstance(message, cls)


def read_frame(data: bytes):
    """What a server's read of ``data`` (then EOF) gives: a message or the exception it raised."""

    async def read():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_message(reader, MAX_BYTES)

    try:
        return asyncio.run(read())
    except (BadRequestError, ServerRefusedError, asyncio.IncompleteReadError) as e:  # EOF: a truncated stream
        return e


@FUZZ
@given(messages)
def test_every_message_roundtrips(message):
    frame = encode_frame(message)
    decoded = read_frame(frame)
    assert type(decoded) is type(message)
    assert pack(decoded) == pack(message)  # tensors compare by their bytes (NaNs included)


def _paths(obj, prefix=()):
    """Every position in a decoded msgpack tree (list indices)."""
    yield prefix
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from _paths(item, (*prefix, i))


def _replace(obj, path, value):
    if not path:
        return value
    out = list(obj)
    out[path[0]] = _replace(obj[path[0]], path[1:], value)
    return out


@FUZZ
@given(messages, st.data(), msgpack_values)
def test_a_message_with_one_field_broken_decodes_or_is_refused(message, data, value):
    obj = to_obj(message)
    path = data.draw(st.sampled_from(list(_paths(obj))))
    payload = msgpack.packb(_replace(obj, path, value), use_bin_type=True)
    check_decodes_or_refuses(type(message), payload)


@FUZZ
@given(messages, st.data())
def test_a_frame_with_bytes_flipped_or_cut_decodes_or_is_refused(message, data):
    frame = bytearray(encode_frame(message))
    for _ in range(data.draw(st.integers(0, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    frame = bytes(frame[: data.draw(st.integers(0, len(frame)))])
    outcome = read_frame(frame)
    assert isinstance(outcome, (Exception, *MESSAGE_CLASSES.values()))


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**16 - 1), st.integers(0, 255), st.binary(max_size=64))
def test_any_header_is_answered_without_reading_past_the_limit(length, version, kind, payload):
    outcome = read_frame(HEADER.pack(length, version, kind) + payload)
    if version != WIRE_VERSION:
        assert isinstance(outcome, ServerRefusedError) and f"wire version {version}" in str(outcome)
    elif length > MAX_BYTES:  # refused from the header alone, although the payload never comes
        assert isinstance(outcome, BadRequestError) and "over the" in str(outcome)
    else:
        assert isinstance(outcome, (Exception, *MESSAGE_CLASSES.values()))


@FUZZ
@given(st.sampled_from(sorted(KINDS.values())), msgpack_values | st.binary(max_size=64))
def test_random_payloads_of_every_kind_decode_or_are_refused(kind, value):
    payload = value if isinstance(value, bytes) else msgpack.packb(value, use_bin_type=True)
    check_decodes_or_refuses(MESSAGE_CLASSES[kind], payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x91" * 100_000 + b"\xc0",  # arrays nested 100,000 deep
        b"\xdd" + (2**32 - 1).to_bytes(4, "big"),  # an array declaring 4 billion items
        b"\xc6" + (2**32 - 1).to_bytes(4, "big") + b"x",  # a bin declaring 4 GiB
        b"\x81\xa1k\xc0",  # a map
        b"\xd4\x01\x00",  # an extension type
        b"\x97" + b"\xc0" * 7 + b"\xc0",  # trailing bytes after the message
    ],
    ids=["deep", "huge array", "huge bin", "map", "ext", "extra"],
)
def test_odd_msgpack_is_refused_as_malformed(payload):
    with pytest.raises(BadRequestError, match="ForwardRequest"):
        unpack(ForwardRequest, payload, MAX_BYTES)


def test_nested_empty_arrays_cannot_blow_up_memory():
    """One byte per empty array: a 4 MiB payload of them used to build 260 MiB of lists."""
    inner = b"\xdc" + (64).to_bytes(2, "big") + b"\x90" * 64
    payload = b"\xdc" + (0xFFFF).to_bytes(2, "big") + inner * 0xFFFF
    tracemalloc.start()
    try:
        with pytest.raises(BadRequestError, match=f"more than {MAX_ITEMS} array items"):
            unpack(PingResponse, payload, 64 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(payload) + 32 * 2**20


@pytest.mark.parametrize(
    "tensor, error",
    [
        (["float32", [0, 2**31 - 1, 2**31 - 1, 2**31 - 1], "float32", b""], "exceeds the limit"),  # empty, huge
        (["bool", [3], "bool", b"\x01\x00\x07"], "must be 0 or 1"),
        (["float32", [2], "int8_rowwise", b"\x01\x02" + b"\x00\x00\xc0\x7f"], "finite and positive"),
    ],
)
def test_odd_tensors_are_refused_by_name(tensor, error):
    with pytest.raises(BadRequestError, match=error):
        decode_tensor(tensor, MAX_BYTES)
