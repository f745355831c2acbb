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
#: Pushed routes: the cheapest ways (last servers) of reaching a boundary that are extended further.
MAX_PUSH_STATES = 8
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
    push: bool = False,
) -> list[Hop] | None:
    """The fastest chain over [start, end) for a step of ``tokens`` tokens, or None if some block is uncovered.

    Relayed (``push`` False), each hop costs the client's round trip to its server. Pushed, a step travels
    client -> first server -> ... -> last server -> client: half the client's RTT to the first and to the last
    server, plus half the RTT between consecutive servers, which a server announces for its likely next
    servers (``next_rtts``); an unannounced pair is assumed to cost the mean of the client's RTTs to both.
    """
    if not 0 <= start < end:
        raise ValueError(f"bad block range [{start}, {end})")
    rtts = rtts or {}
    spans = sorted(spans, key=lambda s: s.peer_id)
    between = {s.peer_id: dict(s.info.next_rtts) for s in spans} if push else {}

    def edge(previous: str, peer: str) -> float:
        if not push:
            return rtts.get(peer, DEFAULT_RTT)
        if not previous:
            return rtts.get(peer, DEFAULT_RTT) / 2
        rtt = between.get(previous, {}).get(peer)
        if rtt is None:
            rtt = (rtts.get(previous, DEFAULT_RTT) + rtts.get(peer, DEFAULT_RTT)) / 2
        return rtt / 2

    # best[(i, peer)] = (cost, hops, previous state) of reaching boundary i with ``peer`` the last server
    best: dict[tuple[int, str], tuple[float, int, tuple[int, str] | None]] = {(start, ""): (0.0, 0, None)}
    for i in range(start, end):
        states = sorted((key for key in best if key[0] == i), key=lambda k: k[1])
        # relayed costs do not depend on the previous server: the best state is enough; pushed, keep a few
        states = sorted(states, key=lambda k: (best[k][0], best[k][1], k[1]))[: MAX_PUSH_STATES if push else 1]
        for state in states:
            cost_i, hops_i, _ = best[state]
            for span in spans:
                if not span.start <= i < span.end or span.peer_id == state[1]:
                    continue
                latency = span.info.inference_latency if span.info.inference_latency > 0 else DEFAULT_LATENCY
                step = edge(state[1], span.peer_id)
                for j in range(i + 1, min(span.end, end) + 1):
                    candidate = (cost_i + step + (j - i) * latency * tokens, hops_i + 1, state)
                    key = (j, span.peer_id)
                    if key not in best or _better(candidate, best[key], span.peer_id, span.peer_id):
                        best[key] = candidate
    finals = [(key, best[key]) for key in best if key[0] == end]
    if not finals:
        return None

    def total(item) -> tuple:
        (_, peer), (cost, hops, _) = item
        return cost + (rtts.get(peer, DEFAULT_RTT) / 2 if push else 0.0), hops, peer

    key, _ = min(finals, key=lambda item: _rounded(total(item)))
    hops: list[Hop] = []
    while best[key][2] is not None:
        previous = best[key][2]
        hops.append(Hop(key[1], previous[0], key[0]))
        key = previous
    return hops[::-1]


def _rounded(key: tuple) -> tuple:
    """Costs within float noise compare equal, so ties fall to fewer hops, then to peer ids."""
    return (round(key[0], 9), *key[1:])


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


def _better(a: tuple, b: tuple, a_peer: str, b_peer: str) -> bool:
    # costs within a relative epsilon count as equal, so float noise does not flip routes
    if not math.isclose(a[0], b[0], rel_tol=1e-9, abs_tol=1e-12):
        return a[0] < b[0]
    return (a[1], a_peer) < (b[1], b_peer)


def format_route(route: list[Hop], names: Mapping[str, str] | None = None) -> str:
    names = names or {}
    return " -> ".join(f"[{h.start}:{h.end}) on {names.get(h.peer_id) or h.peer_id[-8:]}" for h in route)
