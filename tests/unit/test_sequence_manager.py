"""The client's resilience policy on an in-memory swarm view (no network): bans, retries, refusals, and retrying a
banned server that is the only one left once it answers pings again."""

from __future__ import annotations

import time

import pytest

from corolla.client import sequence_manager as sm
from corolla.client.config import ClientConfig
from corolla.swarm.bridge import LoopThread
from corolla.swarm.memory import InMemoryDiscovery
from corolla.swarm.transport import Transport
from corolla.wire.errors import BadRequestError, ChainFailedError, MissingBlocksError, UnknownAdapterError
from corolla.wire.messages import ModelRef
from corolla.wire.records import ServerInfo, ServerState

MODEL = ModelRef("m", "hash-ok")


class PingOnlyTransport(Transport):
    """Servers that answer pings while they are in ``alive`` (and time out otherwise)."""

    def __init__(self, alive: set[str]):
        self.alive = alive

    async def open_stream(self, peer_id):
        raise AssertionError("these tests only ping")

    async def call(self, peer, request, expected, timeout, **kwargs):
        if peer not in self.alive:
            raise TimeoutError
        return object()


@pytest.fixture
def make():
    alive: set[str] = set()
    made = []

    def build(servers, **options):
        options.setdefault("missing_blocks_timeout", 0.3)
        options.setdefault("min_backoff", 0.05)
        manager = sm.RemoteSequenceManager(
            ClientConfig(**options), MODEL, 4, PingOnlyTransport(alive), InMemoryDiscovery(servers), LoopThread()
        )
        made.append(manager)
        alive.update(servers)
        return manager, alive

    yield build
    for manager in made:
        manager.shutdown()


def info(start, end, config_hash="hash-ok"):
    return ServerInfo(ServerState.ONLINE, start, end, inference_latency=0.01, config_hash=config_hash)


def test_route_and_refusal_reasons(make):
    manager, _ = make({"a": info(0, 2), "b": info(2, 4, config_hash="other")})
    with pytest.raises(MissingBlocksError) as e:
        manager.bridge.run(manager.make_route(0, 4))
    assert e.value.blocks == [2, 3] and "config hash" in str(e.value)
    assert [h.peer_id for h in manager.bridge.run(manager.make_route(0, 2))] == ["a"]


def test_ban_time_doubles_and_unreachable_servers_are_banned(make):
    manager, alive = make({"a": info(0, 4), "b": info(0, 4)})
    alive.discard("b")
    route = manager.bridge.run(manager.make_route(0, 4))
    assert [h.peer_id for h in route] == ["a"] and manager.policy.is_banned("b")
    manager.policy.ban("b", "again")
    assert (
        manager.policy._bans["b"][0] - time.monotonic() > manager.config.ban_timeout * 1.5
    )  # 2nd ban: twice as long


def test_banned_only_server_is_retried_when_it_answers(make):
    manager, _ = make({"a": info(0, 4)})
    manager.policy.ban("a", "a missed a deadline")
    route = manager.bridge.run(manager.make_route(0, 4))  # no other server: ping it, lift the ban
    assert [h.peer_id for h in route] == ["a"] and not manager.policy.is_banned("a")


def test_failure_policy(make):
    manager, _ = make({"a": info(0, 4)}, max_retries=2)
    with pytest.raises(BadRequestError):
        manager.policy.note_failure("a", BadRequestError("bad shape"), 1)
    assert not manager.policy.is_banned("a")  # the caller's mistake is not the server's fault
    manager.policy.note_failure("a", EOFError(), 1)
    assert manager.policy.is_banned("a")
    with pytest.raises(ChainFailedError, match="after 3 failures"):
        manager.policy.note_failure("a", EOFError(), 3)


def test_allowed_and_blocked_servers(make):
    servers = {"a": info(0, 4), "b": info(0, 4), "c": info(0, 4)}
    manager, _ = make(servers, blocked_servers=["a", "b"])
    assert [h.peer_id for h in manager.bridge.run(manager.make_route(0, 4))] == ["c"]
    assert "blocked_servers" in manager.refused["a"]
    manager, _ = make(servers, allowed_servers={"b"})
    assert [h.peer_id for h in manager.bridge.run(manager.make_route(0, 4))] == ["b"]
    manager, _ = make(servers, allowed_servers=["a"], blocked_servers=["a"])
    with pytest.raises(MissingBlocksError, match="blocked_servers"):
        manager.bridge.run(manager.make_route(0, 4))


def test_route_filters_on_adapter_and_free_cache(make):
    import dataclasses

    servers = {
        "plain": dataclasses.replace(info(0, 4), free_cache_tokens=10_000),
        "tuned": dataclasses.replace(info(0, 4), adapters=("math",), free_cache_tokens=100),
    }
    manager, _ = make(servers)
    route = manager.bridge.run(manager.make_route(0, 4, adapter="math"))
    assert [h.peer_id for h in route] == ["tuned"]
    with pytest.raises(UnknownAdapterError, match="adapter .poetry."):
        manager.bridge.run(manager.make_route(0, 4, adapter="poetry"))
    # a session needing 1000 tokens of cache skips the server that has room for 100 ...
    route = manager.bridge.run(manager.make_route(0, 4, min_free_cache=1000))
    assert [h.peer_id for h in route] == ["plain"]
    # ... but when nobody has room, it still gets a route (the server makes it wait, bounded)
    route = manager.bridge.run(manager.make_route(0, 4, adapter="math", min_free_cache=1000))
    assert [h.peer_id for h in route] == ["tuned"]


def test_max_throughput_mode_uses_every_replica(make):
    import dataclasses

    servers = {p: dataclasses.replace(info(0, 4), throughput=100.0) for p in ("a", "b")}
    manager, _ = make(servers)
    seen = {manager.bridge.run(manager.make_route(0, 4, mode="max_throughput"))[0].peer_id for _ in range(60)}
    assert seen == {"a", "b"}


def test_ignored_records_are_counted_and_said_once(make, caplog):
    manager, _ = make({"a": info(0, 4)})
    discovery = manager.discovery
    discovery.ignored = {"forged": 2}
    run = manager.bridge.run
    with caplog.at_level("WARNING", logger="corolla.client.sequence_manager"):
        run(manager.update(force=True))
        run(manager.update(force=True))  # nothing new: no second warning
        discovery.ignored = {"forged": 2, "expired": 1}
        run(manager.update(force=True))
    warnings = [r.getMessage() for r in caplog.records if "invalid record" in r.getMessage()]
    assert warnings[0].startswith("Ignored 2 invalid record(s) in the DHT (forged 2)")
    assert warnings[1].startswith("Ignored 1 invalid record(s) in the DHT (expired 1)") and len(warnings) == 2
    assert manager.ignored_records == {"forged": 2, "expired": 1}
    assert "a" in manager.spans  # the valid record is used
