"""Autograd graphs of recent training forwards, kept for their backward: bounded, expiring, per client.

A client that will call backward names its training forward with a random ``graph_id``; the server then runs
that forward under autograd and keeps the graph, so the backward needs no recomputation (a third less
compute per training step). It is only an optimisation: the backward request still carries the span's
inputs, and the server uses a kept graph only if those inputs are equal to the ones it was built from;
otherwise (evicted, expired, another server, another client) it recomputes. Memory is bounded: at most
``max_bytes`` (an estimate of the activations autograd saves) and ``max_graphs`` graphs, the oldest evicted
first; a graph unused for ``ttl`` seconds is dropped. Keys include the client's peer id, so a client can
only use its own graphs. Used from the compute thread only (no locking).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

#: Default bound on the estimated activation memory all kept graphs of a server may hold.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


@dataclass
class SavedGraph:
    inputs: tuple  # (hidden, positions, mask, prompts | None) as received
    output: torch.Tensor  # the span's output, attached to its graph
    leaves: list[torch.Tensor]  # [hidden] (+ [prompts]) requiring grad
    nbytes: int
    expires: float

    def matches(self, hidden, positions, mask, prompts) -> bool:
        theirs = (hidden, positions, mask, prompts)
        return all(
            (a is None and b is None)
            or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))
            for a, b in zip(self.inputs, theirs)
        )


def activation_bytes(config, tokens: int, length: int, blocks: int, itemsize: int) -> int:
    """Estimated bytes autograd saves for ``tokens`` tokens (sequences of ``length``) through ``blocks`` blocks:
    per token and block, about 6 hidden-size vectors (norms, q/k/v, attention output), 4 intermediate-size
    ones (gate, up, activation, product) and one attention row per head."""
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", 1)
    return tokens * blocks * itemsize * (6 * hidden + 4 * intermediate + heads * length)


class SavedGraphs:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_graphs: int = 256, ttl: float = 120.0):
        self.max_bytes, self.max_graphs, self.ttl = max_bytes, max_graphs, ttl
        self._graphs: OrderedDict[tuple[str, bytes], SavedGraph] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def put(self, key: tuple[str, bytes], graph: SavedGraph) -> bool:
        """Keep ``graph`` (evicting the oldest as needed); False if it alone is over the bound."""
        if graph.nbytes > self.max_bytes:
            return False
        self._drop(key)
        self._expire()
        while self._graphs and (
            self.nbytes + graph.nbytes > self.max_bytes or len(self._graphs) >= self.max_graphs
        ):
            self._drop(next(iter(self._graphs)))
        graph.expires = time.monotonic() + self.ttl
        self._graphs[key] = graph
        self.nbytes += graph.nbytes
        return True

    def pop(self, key: tuple[str, bytes]) -> SavedGraph | None:
        self._expire()
        graph = self._graphs.pop(key, None)
        if graph is not None:
            self.nbytes -= graph.nbytes
        return graph

    def _drop(self, key) -> None:
        graph = self._graphs.pop(key, None)
        if graph is not None:
            self.nbytes -= graph.nbytes

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, g in self._graphs.items() if g.expires <= now]:
            self._drop(key)
