"""Integration fixtures: one session-scoped swarm that tests share (they must not break it), and clients."""

from __future__ import annotations

import pytest
import torch
from swarm_harness import Swarm, make_manager

from corolla.wire.records import ServerState


@pytest.fixture(scope="session")
def shared_swarm(session_processes, tiny_llama, tmp_path_factory):
    """Bootstrap + 3 servers with overlapping ranges over the 8 blocks of ``tiny_llama``."""
    swarm = Swarm(session_processes, tmp_path_factory.mktemp("swarm"))
    swarm.start_dht()
    for name, blocks in (("s0", "0:4"), ("s1", "3:8"), ("s2", "2:6")):
        swarm.start_server(name, tiny_llama, "--block_indices", blocks, wait=False)
    for proc in swarm.servers.values():
        swarm.wait_state(proc, ServerState.ONLINE, "tiny-llama")
    yield swarm
    swarm.close()


@pytest.fixture(scope="session")
def manager(shared_swarm, tiny_llama):
    """A client shared by tests that do not break servers (no bans, no kills)."""
    m = make_manager(tiny_llama, shared_swarm.initial_peers)
    yield m
    m.shutdown()


@pytest.fixture(scope="session")
def local_stack(tiny_llama):
    from corolla.models.stack import BlockStack

    return BlockStack.load(str(tiny_llama), 0, 8, dtype=torch.float32)
