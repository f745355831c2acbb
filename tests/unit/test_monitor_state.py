"""The swarm state the monitor serves and `corolla health` prints, built from synthetic DHT records."""

from __future__ import annotations

import json
import math
from dataclasses import fields

from corolla.monitor.state import block_ranges, describe_changes, model_state, swarm_json
from corolla.wire.records import ServerInfo, ServerState

ONLINE, JOINING, OFFLINE = ServerState.ONLINE, ServerState.JOINING, ServerState.OFFLINE
PEER_A = "12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAaaaa1111"
PEER_B = "12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBbbbb2222"
PEER_C = "12D3KooWCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCcccc3333"


def info(start: int, end: int, state: ServerState = ONLINE, **kwargs) -> ServerInfo:
    return ServerInfo(state=state, start=start, end=end, **kwargs)


def records(num_blocks: int, servers: dict[str, ServerInfo]) -> list[dict[str, ServerInfo]]:
    """What fetch_block_infos returns: each server's record under every block of its range."""
    return [{p: i for p, i in servers.items() if i.start <= b < i.end} for b in range(num_blocks)]


def test_coverage_counts_only_online_servers():
    servers = {
        PEER_A: info(0, 4, public_name="a", throughput=10.0),
        PEER_B: info(2, 6, JOINING, public_name="b", throughput=99.0),
        PEER_C: info(3, 8, public_name="c", throughput=4.0),
    }
    m = model_state("tiny", records(8, servers))
    assert m.num_blocks == 8
    assert m.coverage == [1, 1, 1, 2, 1, 1, 1, 1]
    assert [b.joining for b in m.blocks] == [0, 0, 1, 1, 1, 1, 0, 0]
    assert m.gaps == []
    assert m.single_server_blocks == [0, 1, 2, 4, 5, 6, 7]
    assert m.num_online == 2
    assert [b.throughput for b in m.blocks] == [10, 10, 10, 14, 4, 4, 4, 4]  # a joining server adds nothing
    assert m.bottleneck_throughput == 4.0
    assert m.blocks[3].peers == tuple(sorted([PEER_A, PEER_B, PEER_C]))


def test_gaps_from_missing_and_offline_servers():
    servers = {PEER_A: info(0, 3, public_name="a"), PEER_B: info(3, 6, OFFLINE, public_name="b")}
    m = model_state("m", records(8, servers))
    assert m.coverage == [1, 1, 1, 0, 0, 0, 0, 0]
    assert m.gaps == [3, 4, 5, 6, 7]
    assert [b.offline for b in m.blocks] == [0, 0, 0, 1, 1, 1, 0, 0]
    assert m.bottleneck_throughput == 0.0
    assert [s.name for s in m.servers] == ["a", "b"]  # the offline server is still listed
    doc = m.to_json()
    assert doc["fully_covered"] is False and doc["gaps"] == [3, 4, 5, 6, 7]


def test_servers_deduplicated_ordered_and_found_blocks():
    servers = {PEER_C: info(4, 8), PEER_B: info(0, 4, public_name="zed"), PEER_A: info(0, 4, public_name="amy")}
    blocks = records(8, servers)
    del blocks[6][PEER_C]  # one copy of C's record has expired already
    m = model_state("m", blocks)
    assert [s.name for s in m.servers] == ["amy", "zed", "...cccc3333"]  # by first block, then name
    assert m.servers[2].found_blocks == (4, 5, 7)
    assert m.coverage == [2, 2, 2, 2, 1, 1, 0, 1]


def test_records_disagreeing_between_blocks_keep_the_lowest_blocks_copy():
    blocks = [{PEER_A: info(0, 2, ONLINE)}, {PEER_A: info(0, 2, OFFLINE)}]  # an update half propagated
    m = model_state("m", blocks)
    assert len(m.servers) == 1 and m.servers[0].info.state == ONLINE
    assert m.coverage == [1, 0]


def test_json_has_every_record_field_and_is_strict_json():
    rich = info(
        0, 2, public_name="rich", throughput=float("inf"), adapters=("x",), next_rtts=((PEER_B, 0.002),),
        config_hash="abc", relayed=True,
    )  # fmt: skip
    doc = swarm_json([model_state("one", records(2, {PEER_A: rich})), model_state("two", records(3, {}))], now=1.5)
    text = json.dumps(doc, allow_nan=False)  # raises on NaN/inf
    back = json.loads(text)
    assert back["state_version"] == 1 and back["now"] == 1.5
    assert [m["dht_prefix"] for m in back["models"]] == ["one", "two"]
    one, two = back["models"]
    server = one["servers"][0]
    assert set(server["info"]) == {f.name for f in fields(ServerInfo)}
    assert server["peer_id"] == PEER_A and server["name"] == "rich" and server["found_blocks"] == [0, 1]
    assert server["info"]["state"] == "online" and server["info"]["throughput"] is None
    assert server["info"]["adapters"] == ["x"] and server["info"]["next_rtts"] == [[PEER_B, 0.002]]
    assert one["coverage"] == [1, 1] and one["fully_covered"] is True
    assert one["blocks"][0] == {"index": 0, "online": 1, "joining": 0, "offline": 0, "throughput": None,
                                "peers": [PEER_A]}  # fmt: skip
    assert two["coverage"] == [0, 0, 0] and two["gaps"] == [0, 1, 2] and two["servers"] == []
    assert not math.isnan(one["bottleneck_throughput"] or 0)


def test_block_ranges():
    assert block_ranges([]) == "none"
    assert block_ranges([3]) == "3"
    assert block_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


def test_describe_changes():
    before = model_state(
        "m", records(8, {PEER_A: info(0, 4, public_name="a"), PEER_B: info(4, 8, public_name="b")})
    )
    assert describe_changes(None, before) == ["m: 2 servers (2 online)"]
    assert describe_changes(before, before) == []

    b_offline = {PEER_A: info(0, 4, public_name="a"), PEER_B: info(4, 8, OFFLINE, public_name="b")}
    after = model_state("m", records(8, b_offline))
    assert describe_changes(before, after) == [
        "m: server b [4:8): online -> offline",
        "m: no online server for blocks 4-7",
    ]
    moved = model_state("m", records(8, {PEER_A: info(4, 8, public_name="a"), PEER_C: info(0, 4, JOINING)}))
    assert describe_changes(after, moved) == [
        "m: server ...cccc3333 [0:4) appeared (joining)",  # in the new state's order (by first block)
        "m: server a moved [0:4) -> [4:8)",
        "m: server b [4:8) is gone (its records expired)",
        "m: no online server for blocks 0-3",
    ]
    assert describe_changes(moved, before)[-1] == "m: every block is served"
    assert describe_changes(None, after) == ["m: 2 servers (1 online); no online server for blocks 4-7"]
