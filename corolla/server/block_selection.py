"""Which blocks a server hosts, and when it should move: pure functions of the swarm's throughput.

The swarm is seen as a throughput per block: the sum of the announced ``throughput`` of every server
(joining or online) that hosts the block. A chain is only as fast as its weakest block, so the swarm's
*quality* is its minimum per-block throughput, and a block nobody serves (0) is a gap.

- **Joining** (:func:`choose_best_start`): the window of ``num_blocks`` consecutive blocks that is weakest:
  the smallest minimum (a window with a gap always wins), then the smallest total, then the leftmost.
- **Rebalancing** (:func:`rebalance_target`): a server takes itself out of the picture, finds where it
  would join now, and moves only if that raises the swarm's quality by a margin: ``quality now <
  balance_quality x quality after the move``. While gaps remain, a move that fills more gaps than it opens
  also counts. Because the quality after the move is computed without this server at its old place, a
  move that would leave a block it alone serves uncovered has quality 0 there and is never taken.
  Each move strictly raises (min, -gaps), so a sequence of one-at-a-time moves ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """One server's blocks [start, end) and its announced throughput (tokens/s per block)."""

    peer_id: str
    start: int
    end: int
    throughput: float


def block_throughputs(spans: Iterable[Span], num_blocks: int, exclude: str | None = None) -> list[float]:
    """Total announced throughput per block, leaving out the server ``exclude``."""
    totals = [0.0] * num_blocks
    for span in spans:
        if span.peer_id == exclude:
            continue
        for block in range(max(span.start, 0), min(span.end, num_blocks)):
            totals[block] += max(span.throughput, 0.0)
    return totals


def choose_best_start(throughputs: list[float], num_blocks: int) -> int:
    """The start of the weakest window of ``num_blocks`` blocks (gaps first, then least total, leftmost)."""
    total = len(throughputs)
    if not 1 <= num_blocks <= total:
        raise ValueError(f"cannot host {num_blocks} blocks of a model with {total}")
    best_start, best_key = 0, None
    for start in range(total - num_blocks + 1):
        window = throughputs[start : start + num_blocks]
        key = (min(window), sum(window))
        if best_key is None or key < best_key:
            best_start, best_key = start, key
    return best_start


def quality(throughputs: list[float]) -> tuple[float, int]:
    """(bottleneck throughput, number of gaps): the swarm is better when the first is higher, then the second lower."""
    return min(throughputs), sum(1 for t in throughputs if t <= 0)


def rebalance_target(spans: Iterable[Span], me: Span, num_model_blocks: int, balance_quality: float) -> int | None:
    """Where ``me`` should move to (a new start), or None if staying is as good.

    ``balance_quality`` in (0, 1]: move only if the bottleneck now is below this share of the bottleneck
    after the move (0.75: the move must raise it by a third; 1.0: any strict improvement).
    """
    if not 0 < balance_quality <= 1:
        raise ValueError(f"balance_quality must be in (0, 1], got {balance_quality}")
    spans = list(spans)
    length = me.end - me.start
    others = block_throughputs(spans, num_model_blocks, exclude=me.peer_id)
    now = others[:]
    for block in range(me.start, me.end):
        now[block] += me.throughput
    start = choose_best_start(others, length)
    if start == me.start:
        return None
    after = others[:]
    for block in range(start, start + length):
        after[block] += me.throughput
    (now_min, now_gaps), (after_min, after_gaps) = quality(now), quality(after)
    if now_min <= 0 and after_min <= 0:
        return start if after_gaps < now_gaps else None
    return start if now_min < balance_quality * after_min else None
