"""Pure cores of the swarm: span computation, min-latency route planning, block choice."""

from __future__ import annotations

import pytest

from corolla.client.routing import Hop, plan_min_latency, uncovered_blocks
from corolla.server.block_selection import choose_best_start
from corolla.swarm.spans import RemoteSpanInfo, compute_spans, servers_per_block
from corolla.wire.records import ServerInfo, ServerState


def span(peer: str, start: int, end: int, latency: float = 0.01) -> RemoteSpanInfo:
    return RemoteSpanInfo(peer, start, end, ServerInfo(ServerState.ONLINE, start, end, inference_latency=latency))


def test_compute_spans_uses_records_found_and_state():
    a = ServerInfo(ServerState.ONLINE, 0, 4)
    b = ServerInfo(ServerState.JOINING, 2, 6)
    blocks = [{"a": a}, {"a": a}, {"b": b}, {"a": a, "b": b}, {"b": b}, {"b": b}]  # a's block 2 record missing
    spans = compute_spans(blocks)
    assert set(spans) == {"a"} and (spans["a"].start, spans["a"].end) == (0, 2)
    both = compute_spans(blocks, (ServerState.ONLINE, ServerState.JOINING))
    assert (both["b"].start, both["b"].end) == (2, 6)
    assert servers_per_block(blocks, (ServerState.ONLINE,)) == [1, 1, 0, 1, 0, 0]


def test_pushed_routes_count_the_rtts_between_servers():
    """Relayed, only the client's RTTs matter; pushed, the servers' own RTTs to each other (announced as
    next_rtts) do: two servers close to the client but far from each other lose to a close pair."""

    def server(peer, start, end, next_rtts):
        info = ServerInfo(ServerState.ONLINE, start, end, inference_latency=0.001, next_rtts=next_rtts)
        return RemoteSpanInfo(peer, start, end, info)

    spans = [
        server("l1", 0, 4, (("r1", 0.2), ("r2", 0.2))),
        server("r1", 4, 8, ()),
        server("l2", 0, 4, (("r1", 0.2), ("r2", 0.01))),
        server("r2", 4, 8, ()),
    ]
    rtts = {"l1": 0.01, "r1": 0.01, "l2": 0.03, "r2": 0.03}
    assert plan_min_latency(spans, 0, 8, rtts) == [Hop("l1", 0, 4), Hop("r1", 4, 8)]
    assert plan_min_latency(spans, 0, 8, rtts, push=True) == [Hop("l2", 0, 4), Hop("r2", 4, 8)]
    # an unannounced pair is assumed to cost the mean of the client's RTTs to both
    spans[0] = server("l1", 0, 4, ())
    assert plan_min_latency(spans, 0, 8, rtts, push=True) == [Hop("l1", 0, 4), Hop("r1", 4, 8)]


def test_route_prefers_one_hop_when_compute_is_equal():
    spans = [span("full", 0, 8), span("left", 0, 4), span("right", 4, 8)]
    assert plan_min_latency(spans, 0, 8, {"full": 0.01, "left": 0.01, "right": 0.01}) == [Hop("full", 0, 8)]


def test_route_avoids_slow_server_and_high_rtt():
    spans = [span("slow", 0, 8, latency=0.1), span("left", 0, 4), span("right", 4, 8)]
    assert plan_min_latency(spans, 0, 8) == [Hop("left", 0, 4), Hop("right", 4, 8)]
    # a far-away fast server loses to two close ones
    far = [span("far", 0, 8), span("left", 0, 4), span("right", 4, 8)]
    assert plan_min_latency(far, 0, 8, {"far": 1.0, "left": 0.01, "right": 0.01})[0].peer_id == "left"


def test_route_uses_span_prefixes_and_subranges():
    spans = [span("a", 0, 6), span("b", 3, 8, latency=0.001)]
    route = plan_min_latency(spans, 0, 8, {"a": 0.001, "b": 0.001})
    assert route == [Hop("a", 0, 3), Hop("b", 3, 8)]
    assert plan_min_latency(spans, 4, 6, {"a": 0.001, "b": 0.001}) == [Hop("b", 4, 6)]


def test_route_is_none_with_a_gap_and_names_missing_blocks():
    spans = [span("a", 0, 3), span("b", 5, 8)]
    assert plan_min_latency(spans, 0, 8) is None
    assert uncovered_blocks(spans, 0, 8) == [3, 4]


def test_route_is_deterministic_on_ties():
    spans = [span("y", 0, 4), span("x", 0, 4)]
    assert plan_min_latency(spans, 0, 4) == [Hop("x", 0, 4)]


def test_block_choice_fills_gaps_first_then_least_served():
    assert choose_best_start([1, 1, 0, 0, 1, 1], 2) == 2
    # windows of 3: max 2 for starts 0, 1, 2 (sums 4, 4, 3) and max 3 for start 3: the lowest sum wins
    assert choose_best_start([2, 1, 1, 2, 0, 3], 3) == 2
    assert choose_best_start([0, 0, 0, 0], 2) == 0
    with pytest.raises(ValueError):
        choose_best_start([0, 0], 3)


def tp_span(peer: str, start: int, end: int, throughput: float) -> RemoteSpanInfo:
    info = ServerInfo(ServerState.ONLINE, start, end, throughput=throughput, forward_throughput=throughput)
    return RemoteSpanInfo(peer, start, end, info)


def test_max_throughput_spreads_requests_in_proportion_to_speed():
    import random

    from corolla.client.routing import plan_max_throughput

    spans = [tp_span("fast", 0, 8, 300.0), tp_span("slow", 0, 8, 100.0)]
    rng = random.Random(0)
    firsts = [plan_max_throughput(spans, 0, 8, {}, rng)[0].peer_id for _ in range(2000)]
    share = firsts.count("fast") / len(firsts)
    assert 0.70 < share < 0.80  # 3:1 in expectation
    # every route is a valid chain covering the range
    for _ in range(50):
        route = plan_max_throughput([*spans, tp_span("half", 4, 8, 1000.0)], 2, 8, {}, rng)
        assert route[0].start == 2 and route[-1].end == 8
        assert all(a.end == b.start for a, b in zip(route, route[1:]))


def test_max_throughput_reports_gaps_and_uses_the_only_server():
    from corolla.client.routing import plan_max_throughput

    assert plan_max_throughput([tp_span("a", 0, 4, 10.0)], 0, 8) is None
    route = plan_max_throughput([tp_span("a", 0, 4, 10.0), tp_span("b", 4, 8, 1.0)], 0, 8)
    assert route == [Hop("a", 0, 4), Hop("b", 4, 8)]
