"""Route planning: which servers carry blocks [start, end). Pure functions of data, no I/O.

A route is a chain of hops, each a server and the sub-span of its blocks it runs. The min-latency
planner is a shortest path over block boundaries: from boundary ``i`` a server whose span covers block
``i`` can take the chain to any boundary ``j`` up to its span's end, at a cost of its round-trip time
plus ``(j - i)`` times its announced compute seconds per block. Every edge moves forward, so one pass
over the boundaries in order solves it exactly (no priority queue). Prefixes of spans are edges too,
so a route may switch servers mid-span when that is faster. Ties go to the fewest hops, then to the
lexicographically smallest peer id, so the same inputs always give the same route.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from corolla.swarm.spans import RemoteSpanInfo

#: Assumed round-trip time of a server whose RTT has not been measured.
DEFAULT_RTT = 0.05
#: Assumed seconds per token per block of a server that announced no measurement.
DEFAULT_LATENCY = 0.01
#: Assumed tokens/s of a server that announced no throughput.
DEFAULT_THROUGHPUT = 1.0


@dataclass(frozen=True)
class Hop:
    peer_id: str
    start: int
    end: int


def uncovered_blocks(spans: Iterable[RemoteSpanInfo], start: int, end: int) -> list[int]:
    covered = set()
    for span in spans:
        covered.update(range(max(span.start, start), min(span.end, end)))
    return [b for b in range(start, end) if b not in covered]


def plan_min_latency(
    spans: Iterable[RemoteSpanInfo],
    start: int,
    end: int,
    rtts: Mapping[str, float] | None = None,
    tokens: int = 1,
) -> list[Hop] | None:
    """The fastest chain over [start, end) for a step of ``tokens`` tokens, or None if some block is uncovered."""
    if not 0 <= start < end:
        raise ValueError(f"bad block range [{start}, {end})")
    rtts = rtts or {}
    spans = sorted(spans, key=lambda s: s.peer_id)
    # best[i] = (cost, hops, previous boundary, peer) for reaching boundary i
    best: list[tuple[float, int, int, str] | None] = [None] * (end + 1)
    best[start] = (0.0, 0, -1, "")
    for i in range(start, end):
        if best[i] is None:
            continue
        cost_i, hops_i = best[i][0], best[i][1]
        for span in spans:
            if not span.start <= i < span.end:
                continue
            latency = span.info.inference_latency if span.info.inference_latency > 0 else DEFAULT_LATENCY
            rtt = rtts.get(span.peer_id, DEFAULT_RTT)
            for j in range(i + 1, min(span.end, end) + 1):
                candidate = (cost_i + rtt + (j - i) * latency * tokens, hops_i + 1, i, span.peer_id)
                current = best[j]
                if current is None or _better(candidate, current):
                    best[j] = candidate
    if best[end] is None:
        return None
    hops: list[Hop] = []
    j = end
    while j != start:
        _, _, i, peer = best[j]
        hops.append(Hop(peer, i, j))
        j = i
    return hops[::-1]


def plan_max_throughput(
    spans: Iterable[RemoteSpanInfo],
    start: int,
    end: int,
    rtts: Mapping[str, float] | None = None,
    rng: random.Random | None = None,
) -> list[Hop] | None:
    """A chain over [start, end) for a batch forward/backward that spreads load over replicas.

    From each boundary the next hop is drawn among the servers covering that block, with probability
    proportional to the throughput they would give this request: announced tokens/s, discounted by
    the share of the chain's time the hop's RTT costs. Each hop runs as far as its span allows, so
    chains stay short; concurrent requests land on different replicas in proportion to their speed.
    Returns None if some block is uncovered. ``rng`` makes the draw reproducible (tests).
    """
    if not 0 <= start < end:
        raise ValueError(f"bad block range [{start}, {end})")
    rtts = rtts or {}
    rng = rng or random.Random()
    spans = sorted(spans, key=lambda s: s.peer_id)
    hops: list[Hop] = []
    block = start
    while block < end:
        candidates = [s for s in spans if s.start <= block < s.end]
        if not candidates:
            return None
        weights = []
        for span in candidates:
            throughput = span_forward_throughput(span)
            blocks = min(span.end, end) - block
            # seconds per token for this hop, amortising the RTT over a nominal batch of 1024 tokens
            seconds = blocks / throughput + rtts.get(span.peer_id, DEFAULT_RTT) / 1024
            weights.append(blocks / seconds)
        span = rng.choices(candidates, weights=weights)[0]
        hop_end = min(span.end, end)
        hops.append(Hop(span.peer_id, block, hop_end))
        block = hop_end
    return hops


def span_forward_throughput(span: RemoteSpanInfo) -> float:
    """Tokens/s per block a server offers a batch forward: its forward compute, capped by its network."""
    info = span.info
    rate = info.forward_throughput if info.forward_throughput > 0 else info.throughput
    if info.network_throughput > 0:
        rate = min(rate, info.network_throughput) if rate > 0 else info.network_throughput
    return rate if rate > 0 else DEFAULT_THROUGHPUT


def _better(a: tuple[float, int, int, str], b: tuple[float, int, int, str]) -> bool:
    # costs within a relative epsilon count as equal, so float noise does not flip routes
    if not math.isclose(a[0], b[0], rel_tol=1e-9, abs_tol=1e-12):
        return a[0] < b[0]
    return (a[1], a[3]) < (b[1], b[3])


def format_route(route: list[Hop], names: Mapping[str, str] | None = None) -> str:
    names = names or {}
    return " -> ".join(f"[{h.start}:{h.end}) on {names.get(h.peer_id) or h.peer_id[-8:]}" for h in route)
