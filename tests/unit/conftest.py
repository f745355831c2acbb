"""Fixtures of the unit tests that run a swarm in one process (tests/fake_swarm.py)."""

from __future__ import annotations

import pytest
from fake_swarm import FakeSwarm

#: Deadlines, pings and waits short enough for faults to be noticed in a fraction of a second.
FAST = dict(step_timeout_floor=0.2, ping_timeout=0.2, missing_blocks_timeout=2.0, min_backoff=0.05)


@pytest.fixture
def make_swarm(tiny_llama):
    """``make_swarm(**client_options)``: a FakeSwarm of the tiny Llama with FAST options, closed after the test."""
    made = []

    def make(**options):
        swarm = FakeSwarm(tiny_llama, **{**FAST, **options})
        made.append(swarm)
        return swarm

    yield make
    for swarm in made:
        swarm.close()
