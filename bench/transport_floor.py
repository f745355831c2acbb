"""The transport floor: a bare echo to another process, through hivemind's p2pd streams and through plain TCP.

``python -m bench.transport_floor`` is the echo process: it prints "<p2p maddr> <tcp port>", then echoes
length-prefixed frames on a hivemind binary stream handler and on an asyncio TCP server until killed. Both ends
run on the event loop corolla's peers use (``bench.common.run_on_peer_loop``).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time

from bench.common import LOOPBACK, ProcessGroups, run_on_peer_loop


async def _echo(reader, writer) -> None:
    try:
        while True:
            size = int.from_bytes(await reader.readexactly(4), "big")
            data = await reader.readexactly(size)
            writer.write(size.to_bytes(4, "big") + data)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass


async def _serve_echo() -> None:
    from hivemind.p2p import P2P

    p2p = await P2P.create(host_maddrs=[LOOPBACK])
    await p2p.add_binary_stream_handler("bench.echo", lambda info, r, w: _echo(r, w))
    tcp = await asyncio.start_server(_echo, "127.0.0.1", 0)
    maddr = f"{(await p2p.get_visible_maddrs())[0]}/p2p/{p2p.peer_id}"
    print(maddr, tcp.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


async def _rtt_ms(reader, writer, size: int, thrash: bool, buffer, rounds: int) -> float:
    """Median round trip of ``rounds`` echoes of ``size`` bytes, the process idle 3 ms or streaming ``buffer``
    (evicting the caches, as a step's weights do) before each."""
    times = []
    for _ in range(rounds):
        if thrash:
            buffer.sum()
        else:
            time.sleep(0.003)
        t0 = time.perf_counter()
        writer.write(size.to_bytes(4, "big") + b"x" * size)
        await writer.drain()
        await reader.readexactly(4 + size)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


async def _measure(maddr: str, port: int, sizes, rounds: int) -> dict:
    import torch
    from hivemind.p2p import P2P, PeerID

    p2p = await P2P.create(host_maddrs=[LOOPBACK], initial_peers=[maddr])
    try:
        peer = PeerID.from_base58(maddr.split("/p2p/")[1])
        _, r1, w1 = await p2p.call_binary_stream_handler(peer, "bench.echo")
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        buffer = torch.ones(25_000_000)
        out = {}
        for size in sizes:
            for thrash in (False, True):
                key = f"{size} B, {'100 MB streamed' if thrash else 'idle 3 ms'} between messages"
                out[key] = {
                    "hivemind_p2pd_stream_rtt_ms": await _rtt_ms(r1, w1, size, thrash, buffer, rounds),
                    "direct_tcp_rtt_ms": await _rtt_ms(r2, w2, size, thrash, buffer, rounds),
                }
        w1.close()
        w2.close()
        return out
    finally:
        await p2p.shutdown()


def transport_floor(groups: ProcessGroups, sizes=(1024, 4096), rounds: int = 100) -> dict:
    """Median round trip of a bare echo to another process: hivemind binary stream (two p2pd daemons on the
    path) vs a direct asyncio TCP connection, with the processes idle 3 ms between messages or with 100 MB of
    memory streamed between them (as the blocks' weights and the LM head do between generation steps)."""
    proc = groups.start(["-m", "bench.transport_floor"], "echo", stdout=subprocess.PIPE)
    try:
        maddr, port = proc.stdout.readline().split()
        return run_on_peer_loop(_measure(maddr, int(port), sizes, rounds))
    finally:
        groups.kill_many([proc], graceful=0)


if __name__ == "__main__":
    run_on_peer_loop(_serve_echo())
