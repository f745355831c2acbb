"""Length-prefixed frames over an asyncio byte stream, with a hard size limit.

A frame is a 7-byte header ``>IHB`` (payload length, wire version, message kind) followed by the
msgpack payload of one message. The header is checked before the payload is read: a length over
the limit, an unknown kind or another wire version is answered without reading (or buffering) the
payload. The version travels in every frame, so a mismatch is caught on the first message.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from corolla.wire.codec import pack, unpack
from corolla.wire.errors import BadRequestError, ServerRefusedError
from corolla.wire.messages import KINDS, MESSAGE_CLASSES, Kind
from corolla.wire.records import WIRE_VERSION

HEADER = struct.Struct(">IHB")
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024


def encode_frame(message: Any, compression: str | None = None, version: int = WIRE_VERSION) -> bytes:
    payload = pack(message, compression)
    return HEADER.pack(len(payload), version, KINDS[type(message)]) + payload


async def write_message(
    writer: asyncio.StreamWriter,
    message: Any,
    compression: str | None = None,
    max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> None:
    frame = encode_frame(message, compression)
    if len(frame) - HEADER.size > max_bytes:
        raise BadRequestError(
            f"{type(message).__name__} is {len(frame)} bytes, over the {max_bytes}-byte message limit; "
            "send fewer tokens per step"
        )
    writer.write(frame)
    await writer.drain()


async def read_message(reader: asyncio.StreamReader, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Any:
    """Read one frame and decode its message. Raises ``asyncio.IncompleteReadError`` on EOF.

    Raises :class:`BadRequestError` for an oversized or malformed frame (the stream is then out of
    sync: the caller answers with an error and closes it) and :class:`ServerRefusedError` for a frame
    of another wire version.
    """
    header = await reader.readexactly(HEADER.size)
    length, version, kind = HEADER.unpack(header)
    if version != WIRE_VERSION:
        raise ServerRefusedError(
            f"wire version {version} is not supported; this peer speaks version {WIRE_VERSION}"
        )
    if length > max_bytes:
        raise BadRequestError(f"message of {length} bytes is over the {max_bytes}-byte limit")
    try:
        cls = MESSAGE_CLASSES[Kind(kind)]
    except ValueError:
        raise BadRequestError(f"unknown message kind {kind}") from None
    payload = await reader.readexactly(length)
    return unpack(cls, payload, max_tensor_bytes=max_bytes)
