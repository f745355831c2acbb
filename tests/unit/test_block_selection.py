"""Block choice and rebalancing as pure functions on synthetic swarms."""

from __future__ import annotations

import random

import pytest

from corolla.server.block_selection import (
    Span,
    block_throughputs,
    choose_best_start,
    quality,
    rebalance_target,
)


def test_block_throughputs_sums_servers_and_can_leave_one_out():
    spans = [Span("a", 0, 4, 10.0), Span("b", 2, 6, 5.0)]
    assert block_throughputs(spans, 6) == [10, 10, 15, 15, 5, 5]
    assert block_throughputs(spans, 6, exclude="a") == [0, 0, 5, 5, 5, 5]


def test_join_prefers_gaps_then_the_weakest_window():
    # a gap at blocks 4-5 wins over a weak but covered window
    assert choose_best_start([10, 1, 1, 10, 0, 0, 10, 10], 2) == 4
    # no gaps: the window with the lowest minimum, then the lowest total
    assert choose_best_start([10, 3, 9, 9, 3, 4, 10, 10], 2) == 4
    # equal windows: leftmost
    assert choose_best_start([5, 5, 5, 5], 2) == 0
    with pytest.raises(ValueError):
        choose_best_start([1, 1], 3)


def test_quality_is_bottleneck_then_gaps():
    assert quality([3, 0, 5, 0]) == (0, 2)
    assert quality([3, 2, 5]) == (2, 0)


def test_a_duplicate_server_moves_to_fill_a_gap():
    spans = [Span("a", 0, 4, 10), Span("c", 0, 4, 10)]  # blocks 4..7 lost their server
    assert rebalance_target(spans, spans[0], 8, 0.75) == 4


def test_never_moves_away_from_blocks_it_alone_serves():
    # "a" is the only server of 0..3; moving it to the gap at 4..7 would open a new gap
    spans = [Span("a", 0, 4, 10), Span("b", 6, 8, 10)]
    assert rebalance_target(spans, spans[0], 8, 1.0) is None


def test_moves_only_for_a_meaningful_gain():
    # blocks 4..7 are served at 8 tokens/s, 0..3 at 20 (two servers); moving "a" there makes the
    # bottleneck 10 (0..3) vs 8 now: a 25% gain
    spans = [Span("a", 0, 4, 10), Span("c", 0, 4, 10), Span("b", 4, 8, 8)]
    assert rebalance_target(spans, spans[0], 8, 0.75) is None  # wants a third more
    assert rebalance_target(spans, spans[0], 8, 0.9) == 4


def test_a_balanced_swarm_stays_put():
    spans = [Span("a", 0, 4, 10), Span("b", 4, 8, 10), Span("c", 0, 4, 10), Span("d", 4, 8, 10)]
    for me in spans:
        assert rebalance_target(spans, me, 8, 1.0) is None


def test_gaps_first_even_when_the_bottleneck_stays_zero():
    # two gaps (2..3 and 6..7); filling one still leaves the minimum at 0 but there are fewer gaps
    spans = [Span("a", 0, 2, 10), Span("c", 0, 2, 10), Span("b", 4, 6, 10)]
    assert rebalance_target(spans, spans[0], 8, 0.75) in (2, 6)


def test_bad_balance_quality():
    with pytest.raises(ValueError):
        rebalance_target([Span("a", 0, 1, 1)], Span("a", 0, 1, 1), 1, 0)


@pytest.mark.parametrize("seed", range(5))
def test_joins_then_rebalancing_converge_to_full_coverage(seed):
    """Servers join one by one where the swarm is weakest, then take turns rebalancing: every block ends
    covered, and the moves stop (each move strictly improves (bottleneck, gaps), so there is no cycle)."""
    rng = random.Random(seed)
    total = 12
    spans: list[Span] = []
    for i in range(8):
        length, throughput = rng.randint(2, 6), rng.choice([5.0, 10.0, 20.0])
        start = choose_best_start(block_throughputs(spans, total), length)
        spans.append(Span(f"s{i}", start, start + length, throughput))
    assert quality(block_throughputs(spans, total))[1] == 0, "joins alone must already cover every block"

    # churn: drop two servers, then let the others rebalance in random order until nobody moves
    for victim in rng.sample(spans, 2):
        spans.remove(victim)
    before = quality(block_throughputs(spans, total))
    moves = 0
    for _ in range(100):
        moved = False
        for me in rng.sample(spans, len(spans)):
            target = rebalance_target(spans, me, total, 0.75)
            if target is not None:
                old = quality(block_throughputs(spans, total))
                spans[spans.index(me)] = Span(me.peer_id, target, target + me.end - me.start, me.throughput)
                new = quality(block_throughputs(spans, total))
                assert (new[0], -new[1]) > (old[0], -old[1]), "a move must improve the swarm"
                moves += 1
                moved = True
                break
        if not moved:
            break
    else:
        pytest.fail("rebalancing did not settle in 100 rounds")
    after = quality(block_throughputs(spans, total))
    assert (after[0], -after[1]) >= (before[0], -before[1])
    throughputs = block_throughputs(spans, total)
    redundant = [me for me in spans if min(throughputs[me.start : me.end]) > me.throughput]
    if redundant:  # a server no block depends on would have moved to fill any gap
        assert 0 not in throughputs, (spans, throughputs)
