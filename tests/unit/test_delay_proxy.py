"""The bench's TCP delay proxy: bytes arrive intact and in order, half-close and reset cross it, memory is bounded.

(Its delays are measured by ``bench.wan``, which echoes through it first; no timing is asserted here.)
"""

from __future__ import annotations

import asyncio
import os

import pytest

from bench.delay_proxy import LinkShape, reset, serve


async def _echo_server():
    """An echo server that answers EOF with b"bye" and a close; returns (server, port)."""

    async def handle(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _proxy(target_port: int, shape: LinkShape):
    (server,) = await serve([(("127.0.0.1", 0), ("127.0.0.1", target_port))], shape)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    "shape",
    [
        LinkShape(),
        LinkShape(delay=0.002, jitter=0.003),
        LinkShape(delay=0.001, bandwidth=200e6, max_buffer=64 << 10),
    ],
    ids=["plain", "jitter", "capped-small-buffer"],
)
def test_bytes_arrive_in_order_and_eof_crosses(shape):
    async def run():
        echo, echo_port = await _echo_server()
        proxy, port = await _proxy(echo_port, shape)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = os.urandom(1 << 20)  # 16x the small buffer: the proxy must push back, not grow
        received = bytearray()

        async def receive():
            while data := await reader.read(65536):
                received.extend(data)

        receiving = asyncio.ensure_future(receive())
        for i in range(0, len(payload), 10_000):  # many small writes: jitter must not reorder them
            writer.write(payload[i : i + 10_000])
            await writer.drain()
        writer.write_eof()  # half-close: the echo server sees EOF, says bye, and closes
        await asyncio.wait_for(receiving, 30)
        writer.close()
        proxy.close()
        echo.close()
        return payload, bytes(received)

    payload, received = asyncio.run(run())
    assert len(received) == len(payload) + 3
    assert received == payload + b"bye"


def test_a_reset_crosses_as_a_reset():
    async def run():
        async def handle(reader, writer):
            await reader.read(1)
            reset(writer)  # RST to the proxy

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        proxy, port = await _proxy(server.sockets[0].getsockname()[1], LinkShape(delay=0.001))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        await writer.drain()
        try:
            data = await asyncio.wait_for(reader.read(10), 10)
            outcome = "eof" if data == b"" else data
        except ConnectionResetError:
            outcome = "reset"
        writer.close()
        proxy.close()
        server.close()
        return outcome

    assert asyncio.run(run()) == "reset"
