"""A private swarm against outsiders and forgers, over real p2pd daemons and DHT nodes (issue 15, items 1-2).

The shared swarm is private (tests/conftest.py puts a swarm key in $COROLLA_SWARM_KEY for every process). An
outsider is a peer started without it (``swarm_key=""``) or with another swarm's key; a forger holds the key
but signs with its own peer key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time

import pytest
import torch
from swarm_harness import LOOPBACK

from corolla.client.verification import RecordStoreSink
from corolla.swarm.bridge import LoopThread
from corolla.swarm.node import NetworkConfig, SwarmNode
from corolla.swarm.reader import SwarmReader
from corolla.swarm.transport import P2PTransport
from corolla.swarm.trust import SwarmKey, sign_record
from corolla.wire.codec import pack
from corolla.wire.errors import NotAMemberError
from corolla.wire.messages import (
    ForwardRequest,
    ForwardResponse,
    InferenceOpen,
    InferenceOpened,
    PingRequest,
    PingResponse,
    PushedStep,
)
from corolla.wire.records import RecordClaim, ServerInfo, ServerState
from corolla.wire.reports import REPORT_KIND, TamperReport, report_key

PREFIX = "tiny-llama"


@pytest.fixture(scope="module")
def peers(shared_swarm, tmp_path_factory):
    """Started peers by name: an outsider with no key, one with another swarm's key, and a member (forger)."""
    other_key = tmp_path_factory.mktemp("other") / "other.key"
    SwarmKey.generate(other_key)
    bridge = LoopThread(name="trust-peers")
    nodes = {}
    for name, key in (("outsider", ""), ("other_swarm", str(other_key)), ("member", None)):
        config = NetworkConfig(initial_peers=tuple(shared_swarm.initial_peers), host_maddrs=(LOOPBACK,),
                               client_mode=True, nat_port_map=False, swarm_key=key)  # fmt: skip
        nodes[name] = bridge.run(SwarmNode.start(config))
    yield bridge, nodes
    for node in nodes.values():
        bridge.run(node.shutdown(), timeout=10)
    bridge.shutdown()


def _forward(manager) -> ForwardRequest:
    positions = torch.arange(3).unsqueeze(0)
    return ForwardRequest(
        manager.model, 0, 2, torch.randn(1, 3, 64), positions, torch.ones(1, 3, dtype=torch.bool)
    )


def test_outsiders_cannot_call_servers_and_members_keep_serving(shared_swarm, manager, peers):
    bridge, nodes = peers
    server = shared_swarm.servers["s0"].peer_id
    forward = _forward(manager)
    opening = InferenceOpen(manager.model, 0, 2, 16, 1, "", os.urandom(16), os.urandom(16))
    push = PushedStep(os.urandom(16), os.urandom(16), 1, 0, torch.randn(1, 1, 64),
                      torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool))  # fmt: skip
    for name in ("outsider", "other_swarm"):
        node = nodes[name]
        transport = P2PTransport(node.p2p, node.trust.member_proof())
        for request, reply in ((PingRequest(), PingResponse), (forward, ForwardResponse),
                               (opening, InferenceOpened), (push, PingResponse)):  # fmt: skip
            with pytest.raises(NotAMemberError) as info:
                bridge.run(transport.call(server, request, reply, 30))
            expected = "private swarm: start with its swarm key" if name == "outsider" else "wrong swarm key"
            assert expected in str(info.value), (name, type(request).__name__)
        # a member's proof shown by another peer id is worthless: the server checks it against the caller
        stolen = P2PTransport(node.p2p, nodes["member"].trust.member_proof())
        with pytest.raises(NotAMemberError, match="wrong swarm key"):
            bridge.run(stolen.call(server, PingRequest(), PingResponse, 30))
    # the members' client was never disturbed
    out = manager.bridge.run(manager.transport.call(server, forward, ForwardResponse, 30))
    assert out.hidden.shape == (1, 3, 64) and torch.isfinite(out.hidden).all()
    member = nodes["member"]
    assert bridge.run(
        P2PTransport(member.p2p, member.trust.member_proof()).call(server, PingRequest(), PingResponse, 30)
    )


def test_outsiders_see_no_records_and_members_do(shared_swarm, peers):
    bridge, nodes = peers
    for name in ("outsider", "other_swarm"):
        records = nodes[name].records
        assert bridge.run(records.block_infos(PREFIX, 8)) == [{}] * 8, name
        assert bridge.run(records.models()) == [], name
    member = bridge.run(nodes["member"].records.block_infos(PREFIX, 8))
    assert {shared_swarm.servers[n].peer_id for n in ("s0", "s1", "s2")} <= {p for block in member for p in block}


def test_outsider_and_forged_records_are_refused(shared_swarm, peers):
    bridge, nodes = peers
    victim = shared_swarm.servers["s0"].peer_id
    member = nodes["member"]
    fake = ServerInfo(ServerState.ONLINE, 0, 8, public_name="fake", throughput=1e9, inference_latency=1e-6)

    # an outsider announcing the model's blocks: a value not sealed with the key, which no member stores
    assert not bridge.run(nodes["outsider"].records.announce(PREFIX, range(8), fake, 60.0))
    key, subkey = member.trust.dht_name(f"{PREFIX}.0"), member.trust.dht_name(victim)
    claim = RecordClaim("server", key, subkey, victim, time.time() + 60, pack(fake))
    assert not bridge.run(nodes["outsider"].dht.store(key, sign_record(nodes["outsider"].trust, claim),
                                                      claim.expiration, subkey=subkey))  # fmt: skip

    # a member announcing under another server's id (signed with its own key): refused by every DHT node
    assert not bridge.run(member.dht.store(key, sign_record(member.trust, claim), claim.expiration, subkey=subkey))
    # a member's own record stored for longer than it signed (a replay that outlives the record): refused;
    # the same record within its signed life is accepted (so the refusals above are not a broken DHT). It goes
    # under another model's key, not to mislead the shared swarm's clients.
    me = member.trust.peer_key.peer_id
    own = RecordClaim("server", member.trust.dht_name("trust-test.0"), member.trust.dht_name(me), me,
                      time.time() + 60, pack(dataclasses.replace(fake, end=1)))  # fmt: skip
    value = sign_record(member.trust, own)
    assert not bridge.run(member.dht.store(own.dht_key, value, own.expiration + 3600, subkey=own.dht_subkey))
    assert bridge.run(member.dht.store(own.dht_key, value, own.expiration, subkey=own.dht_subkey))

    with SwarmReader(NetworkConfig(initial_peers=tuple(shared_swarm.initial_peers), host_maddrs=(LOOPBACK,),
                                   client_mode=True, nat_port_map=False)) as reader:  # fmt: skip
        block0 = reader.block_infos(PREFIX, 8)[0]
        assert block0[victim].public_name == "s0"  # the victim's own record, not the forgery
        assert "fake" not in {info.public_name for info in block0.values()}
        assert reader.block_infos("trust-test", 1)[0][me].public_name == "fake"  # a member may announce itself
        assert reader.trust_json()["private"]


def test_tamper_reports_reach_health_and_outsiders_cannot_report(shared_swarm, peers, tiny_llama, processes):
    """A member client's report of a server returning wrong activations is a signed record that `corolla health`
    shows in the server's row; an outsider's report is refused by the members' DHT."""
    bridge, nodes = peers
    suspect = shared_swarm.servers["s2"].peer_id
    report = TamperReport(PREFIX, suspect, 2, 6, 0.3, 1e-3, 2.0, 5, 16, "float32", "", ("QmA", "QmB"), (), True,
                          time.time())  # fmt: skip
    assert not bridge.run(nodes["outsider"].records.store(REPORT_KIND, report_key(PREFIX, suspect),
                                                          nodes["outsider"].trust.peer_key.peer_id, report,
                                                          60.0, owned=True))  # fmt: skip
    member = nodes["member"]
    bridge.run(RecordStoreSink(member.records, member.trust.peer_key.peer_id).publish(report))

    cmd = ["-m", "corolla.cli.health", "--initial_peers", *shared_swarm.initial_peers,
           "--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--model", str(tiny_llama), "--json"]  # fmt: skip
    proc = processes.start(cmd, "health-reports", stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, proc.log_path.read_text()[-3000:]
    servers = {s["name"]: s for s in json.loads(out)["models"][0]["servers"]}
    assert servers["s2"]["tamper_reports"]["reporters"] == 1 and servers["s2"]["tamper_reports"]["confirmed"] == 1
    assert servers["s0"]["tamper_reports"] is None
