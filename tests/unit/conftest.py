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


@pytest.fixture(scope="module")
def local_models(tiny_llama):
    """(corolla's client model on an in-process LocalChain, transformers' model, the BlockStack) of the tiny
    Llama: the same weights three ways."""
    import torch
    from transformers import AutoModelForCausalLM

    from corolla import AutoDistributedModelForCausalLM
    from corolla.client.local_chain import LocalChain
    from corolla.models.stack import BlockStack

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    layers = reference.config.num_hidden_layers
    stack = BlockStack.load(str(tiny_llama), 0, layers, dtype=torch.float32, progress=False)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama), chain=LocalChain(stack))
    return model, reference, stack
