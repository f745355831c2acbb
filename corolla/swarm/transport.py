"""Streams between peers, behind one small seam: :class:`Transport` opens a stream to a peer.

The real transport, :class:`P2PTransport`, uses hivemind's raw binary streams carrying corolla's own
frames. Measured on loopback, they cost about a TCP round trip per message and report a killed remote as
EOF within milliseconds; hivemind's protobuf streams are slower and hang silently when the remote dies.
Every call opens one stream on the single protocol name :data:`PROTOCOL`; the first frame's message type
says which call it is. :mod:`corolla.swarm.memory` has the in-process transport that unit tests use: the
same frames over socket pairs to real server handlers, with faults (kill, stall) injected per peer.

Everything else (a :class:`Connection`, a one-shot :meth:`Transport.call`) is built on ``open_stream``,
so both transports share it.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any

from hivemind.p2p import P2P, PeerID

from corolla.wire.errors import error_from_code
from corolla.wire.framing import DEFAULT_MAX_FRAME_BYTES, read_message, write_message
from corolla.wire.messages import ErrorResponse, MemberProof

PROTOCOL = "corolla.rpc.v1"


class Connection:
    """One open stream to a server. Not thread-safe: use it from one coroutine at a time."""

    def __init__(
        self,
        peer_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ):
        self.peer_id = peer_id
        self.reader, self.writer = reader, writer
        self.max_bytes = max_bytes

    async def send(self, message: Any, compression: str | None = None) -> None:
        await write_message(self.writer, message, compression, self.max_bytes)

    async def recv(self, expected: type | None = None) -> Any:
        """The next message; an :class:`ErrorResponse` is raised as its exception class.

        Raises ``asyncio.IncompleteReadError`` (an ``EOFError``) if the remote closed or died.
        """
        message = await read_message(self.reader, self.max_bytes)
        if isinstance(message, ErrorResponse):
            raise error_from_code(message.code, message.message, self.peer_id)
        if expected is not None and not isinstance(message, expected):
            raise error_from_code("bad_request", f"expected {expected.__name__}, got {type(message).__name__}")
        return message

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


class Transport(ABC):
    """Opens streams to peers; what a client (and a server probing its peers) needs of the network.

    In a private swarm ``member_proof`` is set (:meth:`corolla.swarm.trust.Trust.member_proof`) and every
    connection sends it as its first frame; it costs no round trip (the call's first message follows it in the
    same flush)."""

    member_proof: bytes | None = None

    @abstractmethod
    async def open_stream(self, peer_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new bidirectional byte stream to ``peer_id``'s corolla handler."""

    async def connect(self, peer_id: str, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Connection:
        reader, writer = await self.open_stream(peer_id)
        conn = Connection(peer_id, reader, writer, max_bytes)
        if self.member_proof is not None:
            await conn.send(MemberProof(self.member_proof))
        return conn

    async def call(self, peer_id: str, request: Any, expected: type, timeout: float, **kwargs: Any) -> Any:
        """One request, one reply, on a fresh stream, within ``timeout`` seconds."""

        async def _call() -> Any:
            conn = await self.connect(peer_id, **kwargs)
            try:
                await conn.send(request)
                return await conn.recv(expected)
            finally:
                conn.close()

        return await asyncio.wait_for(_call(), timeout)


class P2PTransport(Transport):
    """Streams through the peer's libp2p daemon (hivemind ``P2P``)."""

    def __init__(self, p2p: P2P, member_proof: bytes | None = None):
        self.p2p = p2p
        self.member_proof = member_proof

    async def open_stream(self, peer_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), PROTOCOL)
        return reader, writer


async def call(
    p2p: P2P, peer_id: str, request: Any, expected: type, timeout: float, member_proof: bytes | None, **kwargs: Any
) -> Any:
    """One request, one reply over ``p2p`` (servers' probes and pings); see :meth:`Transport.call`."""
    return await P2PTransport(p2p, member_proof).call(peer_id, request, expected, timeout, **kwargs)
