"""An in-process network for unit tests: the :class:`~corolla.swarm.transport.Transport` and
:class:`~corolla.swarm.discovery.Discovery` seams without p2pd or a DHT.

Peers are stream handlers registered under a peer id (a server's ``RequestHandler``, the same callable
hivemind would be given). A stream is two socket pairs joined by a pump: the caller holds one end, a task
running the handler the other, so every byte goes through the real framing and codec, and the pump is
where faults are injected per peer, the way integration tests inject them with signals:

- :meth:`InMemoryNetwork.kill` (SIGKILL): the peer's streams close (the caller reads EOF) and new dials
  are refused;
- :meth:`InMemoryNetwork.stall` (SIGSTOP): nothing the peer writes gets through and nothing is closed, so
  open streams get no answer and no EOF, and new dials hang; only a deadline notices;
- :meth:`InMemoryNetwork.resume` (SIGCONT): bytes flow again, on old streams and new dials.

Records are whatever the test sets in :class:`InMemoryDiscovery`, as servers would announce them.

:attr:`InMemoryNetwork.handler_closed_first` counts the streams whose handler closed its end while the
caller's was still open: over p2pd such a close may reset the stream and lose the reply's unread tail, so
handlers wait for the caller to hang up (tests check that the count stays 0).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from corolla.swarm.transport import Transport
from corolla.swarm.trust import SwarmKey
from corolla.wire.records import ServerInfo

#: ``handler(stream_info, reader, writer)``: what a server registers (``stream_info.peer_id`` is the caller).
StreamHandler = Callable[[object, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass(frozen=True)
class StreamInfo:
    peer_id: str


class InMemoryNetwork:
    def __init__(self) -> None:
        self._handlers: dict[str, StreamHandler] = {}
        self._flowing: dict[str, asyncio.Event] = {}  # cleared while the peer is stalled
        self._killed: set[str] = set()
        self._tasks: dict[str, set[asyncio.Task]] = {}  # the peer's handlers and pumps
        self._client_ends: dict[str, set[asyncio.StreamWriter]] = {}
        self.dials: dict[str, int] = {}  # peer -> streams opened to it (for tests' assertions)
        self.dials_from: dict[tuple[str, str], int] = {}  # (caller, peer) -> streams the caller opened to it
        #: peer -> its streams whose handler end closed before the caller's (see the module docstring)
        self.handler_closed_first: dict[str, int] = {}

    def add_peer(self, peer_id: str, handler: StreamHandler) -> None:
        self._handlers[peer_id] = handler
        self._flowing[peer_id] = asyncio.Event()
        self._flowing[peer_id].set()
        self._killed.discard(peer_id)
        self._tasks.setdefault(peer_id, set())
        self._client_ends.setdefault(peer_id, set())

    def transport(self, caller: str = "client", swarm_key: SwarmKey | None = None) -> InMemoryTransport:
        """A transport whose streams reach the handlers as coming from peer ``caller`` (a member of
        ``swarm_key``'s private swarm, if given: each stream starts with its member proof)."""
        return InMemoryTransport(self, caller, None if swarm_key is None else swarm_key.member_proof(caller))

    def kill(self, peer_id: str) -> None:
        """Like SIGKILL: open streams end (EOF at the caller), new dials are refused."""
        self._killed.add(peer_id)
        self._flowing[peer_id].set()  # a killed peer is not also stalled
        for task in self._tasks.pop(peer_id, set()):
            task.cancel()
        for writer in self._client_ends.pop(peer_id, set()):
            writer.close()

    async def settle(self) -> None:
        """Wait until every stream's handler and pumps have finished (all calls ended and hung up)."""
        while tasks := {task for peer_tasks in self._tasks.values() for task in peer_tasks if not task.done()}:
            await asyncio.wait(tasks)

    def stall(self, peer_id: str) -> None:
        """Like SIGSTOP: nothing gets through, nothing is closed, new dials hang."""
        self._flowing[peer_id].clear()

    def resume(self, peer_id: str) -> None:
        """Like SIGCONT after :meth:`stall`."""
        self._flowing[peer_id].set()

    async def open_stream(self, caller: str, peer_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if peer_id not in self._handlers or peer_id in self._killed:
            raise ConnectionRefusedError(f"peer {peer_id} is not reachable")
        flowing = self._flowing[peer_id]
        await flowing.wait()  # a dial to a stopped process hangs until the caller's deadline
        client, client_net = await _stream_pair()
        server_net, server = await _stream_pair()
        self.dials[peer_id] = self.dials.get(peer_id, 0) + 1
        self.dials_from[caller, peer_id] = self.dials_from.get((caller, peer_id), 0) + 1
        tasks = self._tasks.setdefault(peer_id, set())
        ends: list[str] = []  # which end reached EOF first: "caller" or "handler"

        def ended(end: str) -> None:
            ends.append(end)
            if ends == ["handler"]:
                self.handler_closed_first[peer_id] = self.handler_closed_first.get(peer_id, 0) + 1

        for coro in (
            self._handlers[peer_id](StreamInfo(caller), *server),
            _pump(client_net[0], server_net[1], flowing, lambda: ended("caller")),
            _pump(server_net[0], client_net[1], flowing, lambda: ended("handler")),
        ):
            task = asyncio.ensure_future(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        self._client_ends.setdefault(peer_id, set()).add(client_net[1])
        return client


async def _stream_pair():
    """Two connected (reader, writer) pairs over a socket pair."""
    a, b = socket.socketpair()
    return await asyncio.open_connection(sock=a), await asyncio.open_connection(sock=b)


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event, on_eof: Callable[[], None]
) -> None:
    """Copy bytes while ``flowing`` is set; EOF is passed on as a close (after calling ``on_eof``)."""
    try:
        while data := await reader.read(1 << 16):
            await flowing.wait()
            writer.write(data)
            await writer.drain()
        on_eof()
        await flowing.wait()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


class InMemoryTransport(Transport):
    def __init__(self, network: InMemoryNetwork, caller: str, member_proof: bytes | None = None):
        self.network, self.caller = network, caller
        self.member_proof = member_proof

    async def open_stream(self, peer_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await self.network.open_stream(self.caller, peer_id)


class InMemoryDiscovery:
    """Records set by the test: ``servers[peer_id] = ServerInfo`` (one record per server, over its span)."""

    def __init__(self, servers: dict[str, ServerInfo] | None = None):
        self.servers: dict[str, ServerInfo] = dict(servers or {})
        self.reads = 0
        #: what a test says was ignored as invalid (records a test sets are taken as valid)
        self.ignored: dict[str, int] = {}

    def rejected(self) -> dict[str, int]:
        return dict(self.ignored)

    async def block_infos(self, dht_prefix: str, num_blocks: int) -> list[dict[str, ServerInfo]]:
        self.reads += 1
        return [
            {peer: info for peer, info in self.servers.items() if info.start <= block < info.end}
            for block in range(num_blocks)
        ]
