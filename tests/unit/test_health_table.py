"""The text of `corolla health` from synthetic DHT records: coverage, gaps, server rows."""

from __future__ import annotations

from dataclasses import fields

from corolla.cli.health_table import (
    COLUMNS,
    coverage_line,
    extra_fields,
    format_health,
    format_model,
    server_rows,
)
from corolla.monitor.state import model_state
from corolla.wire.records import WIRE_VERSION, ServerInfo, ServerState
from corolla.wire.reports import ReportSummary

PEER_A = "12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAaaaa1111"
PEER_B = "12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBbbbb2222"
PEER_C = "12D3KooWCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCcccc3333"


def info(start: int, end: int, state: ServerState = ServerState.ONLINE, **kwargs) -> ServerInfo:
    return ServerInfo(state=state, start=start, end=end, **kwargs)


def state(prefix: str, num_blocks: int, servers: dict[str, ServerInfo]):
    """The model state of what fetch_block_infos returns: each server's record under every block of its range."""
    records = [{p: i for p, i in servers.items() if i.start <= b < i.end} for b in range(num_blocks)]
    return model_state(prefix, records)


def test_servers_reported_for_wrong_activations_are_marked():
    servers = {PEER_A: info(0, 2, public_name="liar"), PEER_B: info(0, 2, public_name="honest")}
    records = [dict(servers), dict(servers)]
    reports = {PEER_A: ReportSummary(reporters=3, confirmed=2, detections=5, latest=1.0e9)}
    model = model_state("m", records, reports=reports)
    rows = {row[0]: row for row in server_rows(model)}
    reported = COLUMNS.index("reported")
    assert rows["liar"][reported] == "3 (2 confirmed)" and rows["honest"][reported] == "-"
    servers_json = {s["name"]: s for s in model.to_json()["servers"]}
    assert servers_json["liar"]["tamper_reports"] == {
        "reporters": 3,
        "confirmed": 2,
        "detections": 5,
        "latest": 1e9,
    }
    assert servers_json["honest"]["tamper_reports"] is None


def test_coverage_characters():
    assert coverage_line([0, 1, 2, 9, 10, 57]) == ".129++"
    assert coverage_line([]) == ""


def test_gaps_counts_and_rows():
    servers = {
        PEER_A: info(
            0,
            4,
            public_name="alpha",
            throughput=123.45,
            inference_latency=0.0021,
            free_cache_tokens=8192,
            software_version="0.1.0",
            torch_dtype="bfloat16",
            quantization="nf4",
            adapters=("lora-a", "lora-b"),
        ),  # fmt: skip
        PEER_B: info(2, 6, public_name="beta", relayed=True, throughput=10.0),
    }
    text = format_model(state("tiny", 8, servers))
    lines = text.splitlines()
    assert lines[0] == "model tiny: 8 blocks, 2 servers (2 online), bottleneck 0.0 tok/s"  # blocks 6-7: none
    assert "[112211..]" in lines[1]
    assert lines[2].endswith("no server: 6-7")
    assert lines[3].endswith("1 server:  0-1, 4-5")
    alpha = next(line for line in lines if line.strip().startswith("alpha")).split()
    assert alpha[: len(COLUMNS)] == [
        "alpha", "[0:4)", "online", "123.5", "2.1", "8192", "0.0", "0.1.0", str(WIRE_VERSION), "bfloat16", "nf4",
        "lora-a,lora-b",
        "direct", "-",  # no client reported it
    ]  # fmt: skip
    beta = next(line for line in lines if line.strip().startswith("beta")).split()
    assert beta[1] == "[2:6)" and beta[7] == "?"  # no software version announced
    assert beta[11:13] == ["-", "relayed"]  # no adapters


def test_bottleneck_is_the_weakest_block():
    servers = {PEER_A: info(0, 4, throughput=5.0), PEER_B: info(2, 4, throughput=7.0)}
    assert "bottleneck 5.0 tok/s" in format_model(state("m", 4, servers))


def test_offline_server_is_listed_but_not_counted():
    servers = {PEER_A: info(0, 3, public_name="up"), PEER_B: info(0, 3, ServerState.OFFLINE, public_name="down")}
    text = format_model(state("m", 3, servers))
    assert "[111]" in text
    assert "2 servers (1 online)" in text
    down = next(line for line in text.splitlines() if "down" in line).split()
    assert down[:3] == ["down", "[0:3)", "offline"]


def test_unnamed_server_shows_short_peer_id_and_rows_sorted():
    servers = {PEER_C: info(4, 8), PEER_A: info(0, 4, public_name="first")}
    rows = server_rows(state("m", 8, servers))
    assert [r[0] for r in rows] == ["first", "...cccc3333"]


def test_fields_without_a_column_get_one():
    """Whatever the record holds beyond the named columns is shown, so new fields are never hidden."""
    extra = extra_fields()
    declared = [f.name for f in fields(ServerInfo)]
    assert all(name in declared for name in extra)
    assert "state" not in extra and "config_hash" not in extra
    text = format_model(state("m", 2, {PEER_A: info(0, 2, public_name="x")}))
    header = next(line for line in text.splitlines() if line.strip().startswith("server"))
    assert header.split()[-len(extra) :] == extra if extra else header.rstrip().endswith("conn")
    row = server_rows(state("m", 2, {PEER_A: info(0, 2)}))[0]
    assert len(row) == len(COLUMNS) + len(extra)


def test_no_records_and_several_models():
    text = format_health([state("a", 2, {}), state("b", 2, {PEER_A: info(0, 2)})])
    sections = text.split("\n\n")
    assert sections[0].startswith("model a: 2 blocks, 0 servers")
    assert "[..]" in sections[0] and "no server records" in sections[0]
    assert "model b" in text and "[11]" in text
    assert text.endswith("\n")
