"""A user-space TCP delay proxy: the internet's latency (and optionally its bandwidth and jitter) on loopback.

This kernel has no netem, so ``bench.wan`` puts one of these in front of every peer: the peer listens on a
fixed port on 127.0.0.1 and announces only the proxy's address (``--announce_maddrs``), so every connection
to it passes through the proxy. Per connection and per direction:

- every chunk read is released to the other side ``delay`` seconds after it was read (plus a uniform
  ``jitter``, never reordering: a chunk is never released before the one read before it);
- with a bandwidth cap, chunks also queue behind each other on a link of that rate (serialization delay),
  then travel ``delay``;
- a half-close (EOF) is forwarded after the data before it; a reset is forwarded as a reset (abort);
- at most ``max_buffer`` bytes wait per direction: past that the proxy stops reading, so TCP's own flow
  control pushes back on the sender (bounded memory).

Run as a program (its own process; ``bench.wan`` starts it in its own process group):

    python -m bench.delay_proxy --pair 127.0.0.1:LISTEN=127.0.0.1:TARGET [--pair ...] --delay_ms 25
        [--jitter_ms 0] [--bandwidth_mbit 0] [--max_buffer 4194304]

It prints ``ready`` on stdout once every listener is up. A delay of 25 ms each way through one proxy makes a
50 ms round trip between a client and the peer behind it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import signal
import socket
import struct
import sys
from dataclasses import dataclass

_EOF, _RESET = b"", None  # queue markers: half-close, reset


@dataclass(frozen=True)
class LinkShape:
    """One direction of a link: one-way delay and jitter (seconds), bandwidth (bits/s, 0 = unlimited)."""

    delay: float = 0.0
    jitter: float = 0.0
    bandwidth: float = 0.0
    max_buffer: int = 4 << 20


class _Direction:
    """Bytes read from one side, released to the other at their time, in order."""

    def __init__(self, shape: LinkShape, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rng):
        self.shape, self.reader, self.writer, self.rng = shape, reader, writer, rng
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.readable = asyncio.Event()
        self.readable.set()
        self.ready = asyncio.Event()
        self.link_free = 0.0  # when the (capped) link finishes sending what is queued
        self.last_release = 0.0

    def _release_time(self, now: float, size: int) -> float:
        shape = self.shape
        sent = now
        if shape.bandwidth > 0 and size:
            self.link_free = max(now, self.link_free) + size * 8 / shape.bandwidth
            sent = self.link_free
        release = sent + shape.delay + (self.rng.uniform(0, shape.jitter) if shape.jitter else 0.0)
        self.last_release = max(release, self.last_release)  # never overtake earlier bytes
        return self.last_release

    def _put(self, data: bytes | None) -> None:
        now = asyncio.get_running_loop().time()
        self.queue.append((self._release_time(now, len(data or b"")), data))
        self.queued += len(data or b"")
        if self.queued >= self.shape.max_buffer:
            self.readable.clear()
        self.ready.set()

    async def read_side(self) -> None:
        try:
            while True:
                await self.readable.wait()
                data = await self.reader.read(65536)
                self._put(data)  # b"" is EOF
                if not data:
                    return
        except (ConnectionError, OSError):
            self._put(_RESET)

    async def write_side(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while not self.queue:
                    self.ready.clear()
                    await self.ready.wait()
                release, data = self.queue.popleft()
                wait = release - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is _RESET:
                    reset(self.writer)
                    return
                if data == _EOF:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    return
                self.writer.write(data)
                await self.writer.drain()
                self.queued -= len(data)
                if self.queued < self.shape.max_buffer:
                    self.readable.set()
        except (ConnectionError, OSError):
            self.reader.feed_eof()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (RST), not a FIN: SO_LINGER with a zero timeout, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


async def _handle(client_r, client_w, target: tuple[str, int], shape: LinkShape, rng) -> None:
    try:
        server_r, server_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.transport.abort()
        return
    up, down = _Direction(shape, client_r, server_w, rng), _Direction(shape, server_r, client_w, rng)
    tasks = [
        asyncio.ensure_future(t) for t in (up.read_side(), up.write_side(), down.read_side(), down.write_side())
    ]
    try:
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        for writer in (client_w, server_w):
            writer.close()


async def serve(pairs: list[tuple[tuple[str, int], tuple[str, int]]], shape: LinkShape, seed: int = 0):
    """Start one listener per (listen, target) pair; returns the asyncio servers."""
    rng = random.Random(seed)
    servers = []
    for listen, target in pairs:

        async def handler(r, w, target=target):
            await _handle(r, w, target, shape, rng)

        servers.append(await asyncio.start_server(handler, *listen, reuse_address=True))
    return servers


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if host != "127.0.0.1" or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected 127.0.0.1:PORT, got {text!r}")
    return host, int(port)


def _pair(text: str) -> tuple[tuple[str, int], tuple[str, int]]:
    listen, sep, target = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected LISTEN=TARGET, got {text!r}")
    return _address(listen), _address(target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.delay_proxy",
        description="TCP proxies on 127.0.0.1 that delay (and optionally rate-limit and jitter) each direction.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--pair", type=_pair, action="append", required=True,
                        help="127.0.0.1:LISTEN=127.0.0.1:TARGET; repeat for more proxies")  # fmt: skip
    parser.add_argument("--delay_ms", type=float, default=0.0, help="one-way delay added to each direction")
    parser.add_argument(
        "--jitter_ms", type=float, default=0.0, help="extra uniform delay in [0, jitter] per chunk"
    )
    parser.add_argument("--bandwidth_mbit", type=float, default=0.0, help="per-direction cap (0 = none)")
    parser.add_argument("--max_buffer", type=int, default=4 << 20, help="bytes held per direction at most")
    parser.add_argument("--seed", type=int, default=0, help="seed of the jitter")
    args = parser.parse_args(argv)
    shape = LinkShape(args.delay_ms / 1000, args.jitter_ms / 1000, args.bandwidth_mbit * 1e6, args.max_buffer)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        servers = await serve(args.pair, shape, args.seed)
        print("ready", flush=True)
        await stop.wait()
        for server in servers:
            server.close()

    asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
