"""A swarm in one process for unit tests: real server handlers and backends, real client code, no p2pd.

Each server is the production stack (``BlockStack`` -> ``BlockBackend`` on a ``ComputeWorker`` ->
``RequestHandler``) registered on an :class:`~corolla.swarm.memory.InMemoryNetwork`; its record is set in
an :class:`~corolla.swarm.memory.InMemoryDiscovery`; the client is a real ``RemoteSequenceManager`` over
the in-memory transport. Faults are injected like the integration tests inject signals: ``kill`` (EOF),
``stall`` / ``resume`` (no answer, no EOF). Everything runs on the client's one network thread.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from corolla.client.config import ClientConfig
from corolla.client.sequence_manager import RemoteSequenceManager
from corolla.models.checkpoint import Checkpoint, config_hash
from corolla.models.stack import BlockStack
from corolla.server.backend import BlockBackend
from corolla.server.compute import ComputeWorker
from corolla.server.handlers import RequestHandler
from corolla.server.memory_cache import MemoryCache
from corolla.swarm.bridge import LoopThread
from corolla.swarm.memory import InMemoryDiscovery, InMemoryNetwork
from corolla.swarm.trust import SwarmKey
from corolla.wire.errors import ServerBusyError
from corolla.wire.framing import read_message, write_message
from corolla.wire.messages import ErrorResponse, MemberProof, ModelRef, PingRequest, PingResponse
from corolla.wire.records import ServerInfo, ServerState


class FakeSwarm:
    def __init__(self, checkpoint: Path, **client_options):
        self.checkpoint = str(checkpoint)
        config = Checkpoint(self.checkpoint).config
        self.num_blocks = config.num_hidden_layers
        self.model = ModelRef("fake", config_hash(config))
        self.network = InMemoryNetwork()
        #: a private swarm, as every swarm in the tests is unless a test says otherwise
        self.swarm_key = SwarmKey(bytes(range(32)))
        self.discovery = InMemoryDiscovery()
        self.workers: list[ComputeWorker] = []
        self.stacks: dict[tuple[int, int], BlockStack] = {}
        client_options.setdefault("update_period", 3600.0)  # tests re-read records by forcing it
        bridge = LoopThread(name="fake-swarm")
        self.manager = RemoteSequenceManager(
            ClientConfig(**client_options), self.model, self.num_blocks, self.network.transport(swarm_key=self.swarm_key),
            self.discovery,
            bridge,
        )  # fmt: skip

    def add_server(
        self,
        peer: str,
        start: int,
        end: int,
        latency: float = 0.01,
        inference_max_length: int = 512,
        cache_tokens: int = 4096,
        alloc_timeout: float = 5.0,
        **info,
    ) -> None:
        """A server hosting blocks [start, end), announcing ``latency`` seconds per token per block, with a KV
        budget of ``cache_tokens`` per block (a session waits ``alloc_timeout`` s for room)."""
        if (start, end) not in self.stacks:
            self.stacks[start, end] = BlockStack.load(
                self.checkpoint, start, end, dtype=torch.float32, progress=False
            )
        worker = ComputeWorker(name=f"compute-{peer}")
        self.workers.append(worker)
        backend = BlockBackend(self.stacks[start, end], worker)
        record = ServerInfo(
            ServerState.ONLINE, start, end, public_name=peer, throughput=100.0, inference_latency=latency,
            free_cache_tokens=cache_tokens, inference_max_length=inference_max_length, max_batch_size=8,
            config_hash=self.model.config_hash,
        )  # fmt: skip
        record = dataclasses.replace(record, **info)
        handler = RequestHandler(
            backend, MemoryCache(cache_tokens * (end - start), alloc_timeout), self.model, lambda: record,
            inference_max_length=inference_max_length, max_batch_size=8, request_timeout=30.0, session_timeout=30.0,
            max_message_bytes=64 * 2**20, transport=self.network.transport(caller=peer, swarm_key=self.swarm_key),
            swarm_key=self.swarm_key,
        )  # fmt: skip
        self.network.add_peer(peer, handler)
        self.discovery.servers[peer] = record

    def add_broken_server(self, peer: str, start: int, end: int, latency: float = 0.001) -> None:
        """A server that answers pings but refuses every other call with an error (not the caller's fault)."""

        async def handler(stream_info, reader, writer):
            request = await read_message(reader)
            if isinstance(request, MemberProof):
                request = await read_message(reader)
            if isinstance(request, PingRequest):
                await write_message(writer, PingResponse(0.0))
            else:
                await write_message(writer, ErrorResponse(ServerBusyError.code, "broken on purpose"))
            writer.close()

        self.network.add_peer(peer, handler)
        self.discovery.servers[peer] = ServerInfo(
            ServerState.ONLINE, start, end, public_name=peer, inference_latency=latency,
            config_hash=self.model.config_hash,
        )  # fmt: skip

    def _on_loop(self, fn, *args) -> None:
        async def run():
            fn(*args)

        self.manager.bridge.run(run())

    def kill(self, peer: str) -> None:
        self._on_loop(self.network.kill, peer)

    def stall(self, peer: str) -> None:
        self._on_loop(self.network.stall, peer)

    def resume(self, peer: str) -> None:
        self._on_loop(self.network.resume, peer)

    def later(self, seconds: float, fn, *args) -> None:
        """Run ``fn(*args)`` on the network thread after ``seconds`` (while the client waits)."""
        loop = self.manager.bridge.loop
        loop.call_soon_threadsafe(lambda: loop.call_later(seconds, fn, *args))

    def reference(self) -> BlockStack:
        return BlockStack.load(self.checkpoint, 0, self.num_blocks, dtype=torch.float32, progress=False)

    def close(self) -> None:
        self.manager.shutdown()
        for worker in self.workers:
            worker.shutdown()
