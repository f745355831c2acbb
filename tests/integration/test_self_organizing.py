"""A swarm that organizes itself: servers told only how many blocks to host cover the model, a lost span
is re-covered by a server that moves, and generations survive random churn token-exact. Fresh swarms.

Waits here are generous guards against a hang; how long re-covering takes is measured by bench/churn.py.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import torch
from swarm_harness import Swarm
from transformers import LlamaForCausalLM

from corolla.wire.records import ServerState

PREFIX = "tiny-llama"
BLOCKS = 8
AUTO = ("--num_blocks", "4", "--balance_period", "1", "--update_period", "1")


def online_coverage(swarm: Swarm) -> list[set[str]]:
    return [
        {peer for peer, info in servers.items() if info.state == ServerState.ONLINE and info.start <= b < info.end}
        for b, servers in enumerate(swarm.records(PREFIX, BLOCKS))
    ]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def forward_matches(swarm, tiny_llama, local_stack) -> None:
    from swarm_harness import make_manager

    manager = make_manager(tiny_llama, swarm.initial_peers)
    try:
        hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
        positions = torch.arange(5).expand(2, 5)
        mask = torch.ones(2, 5, dtype=torch.bool)
        got = manager.forward(hidden, positions, mask)
        assert torch.allclose(got, local_stack(hidden, positions, mask), atol=1e-5)
    finally:
        manager.shutdown()


def test_servers_place_themselves_and_a_lost_span_is_recovered(processes, tiny_llama, tmp_path, local_stack):
    swarm = Swarm(processes, tmp_path)
    swarm.start_dht()
    try:
        for name in ("a", "b", "c"):  # one at a time: each sees where the others went
            swarm.start_server(name, tiny_llama, *AUTO)
        coverage = online_coverage(swarm)
        assert all(coverage), f"blocks without a server: {[b for b, s in enumerate(coverage) if not s]}"
        by_peer = {p.peer_id: (n, p) for n, p in swarm.servers.items()}
        # a server that is the only one for some block
        sole = next(next(iter(peers)) for peers in coverage if len(peers) == 1)
        name, victim = by_peer[sole]
        lost = [b for b, peers in enumerate(coverage) if peers == {sole}]
        forward_matches(swarm, tiny_llama, local_stack)

        t0 = time.monotonic()
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()

        def recovered():
            coverage = online_coverage(swarm)
            return all(peers - {sole} for peers in coverage)

        wait_until(recovered, 120, f"blocks {lost} (lost with server {name}) to be served again")
        print(f"blocks {lost} re-covered {time.monotonic() - t0:.1f} s after SIGKILL of their only server")
        mover = {p for b in lost for p in online_coverage(swarm)[b]} - {sole}
        assert mover and all(p in by_peer for p in mover), "one of the remaining servers moved there"
        assert all(online_coverage(swarm)), "the move left no other block uncovered"
        forward_matches(swarm, tiny_llama, local_stack)
    finally:
        swarm.close()


def test_churn_generations_complete_token_exact(processes, tiny_llama, tmp_path):
    """Servers are killed (SIGKILL or SIGTERM) and replaced at random while a client generates: every
    generation completes and equals local transformers' greedy output."""
    from corolla import AutoDistributedModelForCausalLM

    swarm = Swarm(processes, tmp_path)
    swarm.start_dht()
    names = ["s0", "s1", "s2", "s3"]
    for name in names:
        swarm.start_server(name, tiny_llama, *AUTO)
    reference = LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompts = [torch.randint(3, 320, (1, 6), generator=torch.Generator().manual_seed(i)) for i in range(40)]
    expected = [reference.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=10, do_sample=False)
                for p in prompts]  # fmt: skip
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=swarm.initial_peers, step_timeout_floor=0.3, ping_timeout=0.7, update_period=1.0
    )
    rng = random.Random(1234)
    stop = threading.Event()
    events: list[str] = []
    errors: list[BaseException] = []
    current: dict[str, set[str]] = {}

    def churn():
        restarts = 0
        try:
            while not stop.is_set():
                time.sleep(rng.uniform(0.5, 1.5))
                # mostly a server the current generation goes through, so that failover is exercised
                in_route = [n for n, p in swarm.servers.items() if p.peer_id in current.get("route", ())]
                name = rng.choice(in_route if in_route and rng.random() < 0.75 else sorted(swarm.servers))
                proc = swarm.servers.pop(name)
                sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
                os.killpg(proc.pid, sig)
                proc.wait(timeout=60)
                events.append(f"{sig.name} {name}")
                restarts += 1
                # a fresh server (new identity) joins wherever the swarm is weakest; wait until it serves
                # before the next kill, so some server is always left for every block
                swarm.start_server(f"r{restarts}", tiny_llama, *AUTO)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    completed, failovers = 0, 0
    try:
        i, guard = 0, time.monotonic() + 400  # guards against a hang only
        while (i < 30 or len(events) < 3) and time.monotonic() < guard and not errors:
            ids = prompts[i % len(prompts)]
            with model.inference_session(max_length=32) as session:
                streamer = _RouteWatcher(session, current)
                got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                     session=session, streamer=streamer)  # fmt: skip
                failovers += session.chain_session.failovers
            assert torch.equal(got, expected[i % len(prompts)]), f"generation {i} differs after {events}"
            completed += 1
            i += 1
    finally:
        stop.set()
        thread.join(timeout=120)
        model.shutdown()
        swarm.close()
    assert not errors, f"churn thread failed: {errors[0]!r}"
    assert completed >= 30 and len(events) >= 3, (completed, events)
    print(f"{completed} generations token-exact through {len(events)} kills ({events}); {failovers} failovers")


class _RouteWatcher:
    """A generate streamer that publishes the session's current route for the churn thread."""

    def __init__(self, session, current: dict):
        self.session, self.current = session, current

    def put(self, value) -> None:
        route = self.session.chain_session.route
        self.current["route"] = {hop.peer_id for hop in route}

    def end(self) -> None:
        pass
