"""The monitor's collector (on a fake DHT reader), its web app (in-process client, no sockets), model arguments."""

from __future__ import annotations

import logging
import time

import pytest
from fastapi.testclient import TestClient

from corolla.cli.health import resolve_model
from corolla.monitor.app import create_app
from corolla.monitor.collector import PROBE_BLOCKS, StateCollector, read_models
from corolla.wire.records import ServerInfo, ServerState

PEER_A = "12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAaaaa1111"
PEER_B = "12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBbbbb2222"


class FakeReader:
    """Stands in for SwarmReader: serves the records set on it, or raises ``failure``."""

    timeout = 1.0

    def __init__(self, servers: dict[str, ServerInfo]):
        self.servers = servers
        self.failure: Exception | None = None
        self.reads: list[tuple[str, int]] = []

    def block_infos(self, dht_prefix: str, num_blocks: int):
        self.reads.append((dht_prefix, num_blocks))
        if self.failure is not None:
            raise self.failure
        return [{p: i for p, i in self.servers.items() if i.start <= b < i.end} for b in range(num_blocks)]

    def tamper_reports(self, dht_prefix: str, peers: list[str]) -> dict:
        return {}

    def trust_json(self) -> dict:
        return {"private": True, "key": "0123abcd", "ignored_records": {"forged": 1}}


def two_servers(b_state: ServerState = ServerState.ONLINE) -> dict[str, ServerInfo]:
    return {
        PEER_A: ServerInfo(ServerState.ONLINE, 0, 4, public_name="a"),
        PEER_B: ServerInfo(b_state, 4, 8, public_name="b"),
    }


def test_collector_reads_every_model_and_logs_changes(caplog):
    reader = FakeReader(two_servers())
    collector = StateCollector(reader, [("m", 8), ("other", 2)], period=5.0)
    before = collector.latest()
    assert before["models"] == [] and before["updated_at"] is None and before["refresh_seconds"] == 5.0

    with caplog.at_level(logging.INFO, logger="corolla.monitor"):
        collector.refresh()
        reader.servers = two_servers(ServerState.OFFLINE)
        collector.refresh()
    assert reader.reads == [("m", 8), ("other", 2)] * 2
    state = collector.latest()
    assert [m["dht_prefix"] for m in state["models"]] == ["m", "other"]
    assert state["models"][0]["gaps"] == [4, 5, 6, 7] and state["error"] is None
    assert state["swarm"] == {"private": True, "key": "0123abcd", "ignored_records": {"forged": 1}}
    assert state["updated_at"] is not None and state["served_at"] >= state["updated_at"]
    messages = [r.getMessage() for r in caplog.records]
    assert "m: 2 servers (2 online)" in messages
    assert "m: server b [4:8): online -> offline" in messages
    assert "m: no online server for blocks 4-7" in messages


def test_collector_keeps_the_last_state_when_a_read_fails(caplog):
    reader = FakeReader(two_servers())
    collector = StateCollector(reader, [("m", 8)], period=5.0)
    collector.refresh()
    good = collector.latest()
    reader.failure = TimeoutError("DHT get timed out")
    with caplog.at_level(logging.WARNING, logger="corolla.monitor"):
        collector.refresh()
    stale = collector.latest()
    assert stale["error"] == "TimeoutError: DHT get timed out"
    assert stale["models"] == good["models"] and stale["updated_at"] == good["updated_at"]
    assert any("Reading the DHT failed" in r.getMessage() for r in caplog.records)
    reader.failure = None
    collector.refresh()
    assert collector.latest()["error"] is None


def test_collector_thread_starts_and_stops():
    reader = FakeReader(two_servers())
    collector = StateCollector(reader, [("m", 8)], period=0.01).start()
    try:
        deadline = time.monotonic() + 60  # only guards against a hang
        while len(reader.reads) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        collector.stop()
    assert len(reader.reads) >= 3, "the collector thread did not refresh periodically"
    assert collector.latest()["models"][0]["coverage"] == [1] * 8
    assert not collector._thread.is_alive()
    with pytest.raises(ValueError):
        StateCollector(reader, [("m", 8)], period=0)


def test_app_serves_page_assets_and_state():
    reader = FakeReader(two_servers())
    collector = StateCollector(reader, [("m", 8)], period=2.0)
    collector.refresh()
    client = TestClient(create_app(collector.latest))

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/dashboard.js">' in page.text and "/static/dashboard.css" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline

    script = client.get("/static/dashboard.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "/api/v1/state" in script.text and "data-coverage" in script.text
    assert "innerHTML" not in script.text  # swarm-provided strings are inserted as text only
    style = client.get("/static/dashboard.css")
    assert style.status_code == 200 and "text/css" in style.headers["content-type"]
    for name in ("../app.py", "index.html", "missing.js"):
        assert client.get(f"/static/{name}").status_code == 404

    state = client.get("/api/v1/state")
    assert state.status_code == 200 and state.headers["cache-control"] == "no-store"
    doc = state.json()
    assert doc["models"][0]["dht_prefix"] == "m" and doc["models"][0]["fully_covered"] is True
    assert [s["name"] for s in doc["models"][0]["servers"]] == ["a", "b"]
    assert client.get("/docs").status_code == 404  # FastAPI's docs load assets from a CDN: off


def test_block_count_inferred_from_the_records_when_not_given():
    reader = FakeReader(two_servers())
    (given, inferred) = read_models(reader, [("m", 10), ("m", None)])
    assert given.num_blocks == 10 and given.gaps == [8, 9] and not given.num_blocks_inferred
    assert inferred.num_blocks == 8 and inferred.gaps == [] and inferred.num_blocks_inferred
    assert reader.reads == [("m", 10), ("m", PROBE_BLOCKS)]  # the probe covered every announced block
    assert inferred.to_json()["num_blocks_inferred"] is True

    big = FakeReader({PEER_A: ServerInfo(ServerState.ONLINE, 150, 200, public_name="late")})
    state = read_models(big, [("big", None)])[0]
    assert big.reads == [("big", PROBE_BLOCKS)]  # nothing in the first blocks: cannot know of later ones
    assert state.num_blocks == 0 and state.servers == ()

    far = FakeReader(
        {PEER_A: ServerInfo(ServerState.ONLINE, 0, 200), PEER_B: ServerInfo(ServerState.ONLINE, 5, 9)}
    )
    state = read_models(far, [("far", None)])[0]
    assert far.reads == [("far", PROBE_BLOCKS), ("far", 200)] and state.num_blocks == 200
    assert state.gaps == [] and state.coverage[5:9] == [2] * 4

    empty = read_models(FakeReader({}), [("none", None)])[0]
    assert empty.num_blocks == 0 and empty.gaps == [] and empty.to_json()["fully_covered"] is False


def test_model_arguments():
    assert resolve_model("tiny-llama", None) == ("tiny-llama", None)  # a bare prefix: count from the records
    assert resolve_model("tiny-llama", 8) == ("tiny-llama", 8)
    assert resolve_model("org/Some.Model-8B", 32) == ("Some-Model-8B", 32)  # a Hub id: its prefix, as servers
    with pytest.raises(SystemExit, match="does not exist"):
        resolve_model("/nonexistent/checkpoint", 8)


def test_model_argument_checkpoint_folder(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2).save_pretrained(
        tmp_path / "my.model"
    )
    assert resolve_model(str(tmp_path / "my.model"), None) == ("my-model", 3)
    assert resolve_model(str(tmp_path / "my.model"), 5) == ("my-model", 5)
    (tmp_path / "broken").mkdir()
    with pytest.raises(SystemExit, match="cannot read the config of checkpoint"):
        resolve_model(str(tmp_path / "broken"), None)


def test_monitor_socket_and_flags():
    from corolla.cli.monitor import bind, build_parser, url_of

    sock = bind("127.0.0.1", 0)
    try:
        url = url_of(sock)
        assert url.startswith("http://127.0.0.1:") and url.endswith("/") and int(url.split(":")[-1][:-1]) > 0
        with pytest.raises(SystemExit, match="cannot listen on 127.0.0.1"):
            bind("127.0.0.1", sock.getsockname()[1])  # taken: a clear error, before joining the DHT
    finally:
        sock.close()
    args = build_parser().parse_args(["--model", "m", "--initial_peers", "/ip4/1.2.3.4/tcp/1/p2p/x"])
    assert (args.host, args.port, args.refresh, args.model, args.num_blocks) == (
        "127.0.0.1",
        8100,
        2.0,
        ["m"],
        None,
    )
    help_text = build_parser().format_help()
    for option in ("--model", "--num_blocks", "--host", "--port", "--refresh", "--initial_peers", "--log_level"):
        assert option in help_text
