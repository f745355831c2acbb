"""A server in the chain dies (SIGKILL) or stalls (SIGSTOP) mid-session: the session goes on through the
others with identical results, and a killed server leaves no helper process behind. Fresh swarms."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from swarm_harness import Swarm, alive, helper_pids, make_manager

from corolla.wire.records import ServerState


@pytest.fixture
def swarm(processes, tiny_llama, tmp_path):
    swarm = Swarm(processes, tmp_path)
    swarm.start_dht()
    for name, blocks in (("full", "0:8"), ("left", "0:4"), ("right", "4:8")):
        swarm.start_server(name, tiny_llama, "--block_indices", blocks, wait=False)
    for proc in swarm.servers.values():
        swarm.wait_state(proc, ServerState.ONLINE, "tiny-llama")
    yield swarm
    swarm.close()


def _generate_with_fault(swarm, tiny_llama, local_stack, fault):
    """Run 12 one-token steps after a 4-token prefill; apply ``fault`` to a server of the chain at step 6."""
    manager = make_manager(tiny_llama, swarm.initial_peers, step_timeout_floor=0.3, ping_timeout=0.7)
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 16, 64, generator=g)
    positions = torch.arange(16)[None]
    mask = torch.ones(1, 16, dtype=torch.bool)
    expected = local_stack(hidden, positions, mask)
    by_peer = {p.peer_id: p for p in swarm.servers.values()}
    try:
        with manager.open_session(max_length=32) as session:
            outs = [session.step(hidden[:, :4], positions[:, :4], mask[:, :4])]
            victim = None
            pauses = []
            for t in range(4, 16):
                if t == 6:
                    victim = by_peer[session.route[0].peer_id]
                    fault(victim)
                t0 = time.perf_counter()
                outs.append(session.step(hidden[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1]))
                pauses.append(time.perf_counter() - t0)
            assert session.failovers >= 1
            assert victim.peer_id not in {hop.peer_id for hop in session.route}
        print(f"failover pause: {max(pauses):.2f} s")
        assert torch.allclose(torch.cat(outs, dim=1), expected, atol=1e-5)
        return victim
    finally:
        manager.shutdown()


def test_sigkill_mid_session_fails_over_and_leaves_no_orphans(swarm, tiny_llama, local_stack):
    helpers = {}

    def kill(proc):
        helpers["pids"] = helper_pids(proc.pid)
        assert helpers["pids"], "a server should have p2pd and the reaper as children"
        os.kill(proc.pid, signal.SIGKILL)  # the server process only, not its group

    victim = _generate_with_fault(swarm, tiny_llama, local_stack, kill)
    deadline = time.monotonic() + 10
    while alive(helpers["pids"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive(helpers["pids"]) == [], "p2pd/reaper outlived the SIGKILLed server"
    # the same identity comes back as the same peer
    restarted = swarm.start_server("again", tiny_llama, "--block_indices", "0:2", identity=victim.identity)
    assert restarted.peer_id == victim.peer_id


class _KillAfter:
    """A generate streamer that applies ``fault`` to the first server of the session's chain after n tokens."""

    def __init__(self, session, by_peer, fault, n: int, hop: int = 0):
        self.session, self.by_peer, self.fault, self.n, self.hop = session, by_peer, fault, n, hop
        self.puts, self.victim = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == self.n:
            self.victim = self.by_peer[self.session.chain_session.route[self.hop].peer_id]
            self.fault(self.victim)

    def end(self) -> None:
        pass


@pytest.mark.parametrize("fault", ["sigkill", "sigstop"])
def test_generate_survives_a_server_fault_token_exact(swarm, tiny_llama, fault):
    from transformers import LlamaForCausalLM

    from corolla import AutoDistributedModelForCausalLM

    ids = torch.randint(3, 320, (1, 16), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    reference = LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=swarm.initial_peers, step_timeout_floor=0.3, ping_timeout=0.7, update_period=1.0
    )
    if fault == "sigkill":
        apply = lambda proc: os.kill(proc.pid, signal.SIGKILL)  # noqa: E731
    else:
        apply = lambda proc: os.killpg(proc.pid, signal.SIGSTOP)  # noqa: E731
    by_peer = {p.peer_id: p for p in swarm.servers.values()}
    try:
        with model.inference_session(max_length=64) as session:
            streamer = _KillAfter(session, by_peer, apply, n=6)
            got = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, session=session,
                                 streamer=streamer)  # fmt: skip
            assert streamer.victim is not None
            assert session.chain_session.failovers >= 1
        assert torch.equal(got, expected)
    finally:
        model.shutdown()


@pytest.fixture
def chain_swarm(processes, tiny_llama, tmp_path):
    """Three hops with a spare for the middle one: [0:3) [3:6) [6:8), and another [3:6)."""
    swarm = Swarm(processes, tmp_path)
    swarm.start_dht()
    for name, blocks in (("head", "0:3"), ("middle", "3:6"), ("spare", "3:6"), ("tail", "6:8")):
        swarm.start_server(name, tiny_llama, "--block_indices", blocks, wait=False)
    for proc in swarm.servers.values():
        swarm.wait_state(proc, ServerState.ONLINE, "tiny-llama")
    yield swarm
    swarm.close()


@pytest.mark.parametrize("fault,speculate", [("sigkill", True), ("sigstop", False)])
def test_pushed_chain_survives_a_fault_of_its_middle_server(chain_swarm, tiny_llama, fault, speculate):
    """Steps go server to server (push, the default); the middle server dies or stalls mid-generation, with
    and without speculative decoding (n-gram drafts, verified k + 1 tokens at a time): tokens stay exact."""
    from transformers import LlamaForCausalLM

    from corolla import AutoDistributedModelForCausalLM

    ids = torch.tensor([[11, 12, 13, 14, 15, 11, 12, 13, 14, 16, 11, 12, 13, 14]])
    reference = LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    expected = reference.generate(ids, max_new_tokens=24, do_sample=False)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=chain_swarm.initial_peers, step_timeout_floor=0.3, ping_timeout=0.7,
        update_period=1.0,
    )  # fmt: skip
    signal_of = signal.SIGKILL if fault == "sigkill" else signal.SIGSTOP
    by_peer = {p.peer_id: p for p in chain_swarm.servers.values()}
    try:
        with model.inference_session(max_length=64) as session:
            model.generate(ids[:, :4], max_new_tokens=1, do_sample=False, session=session)  # opens the chain
            session.rewind(0)  # the same session again from the start, its chain open
            assert len(session.chain_session.route) == 3
            streamer = _KillAfter(session, by_peer, lambda proc: os.killpg(proc.pid, signal_of), n=6, hop=1)
            options = {"prompt_lookup_num_tokens": 4} if speculate else {}
            got = model.generate(ids, max_new_tokens=24, do_sample=False, session=session, streamer=streamer,
                                 **options)  # fmt: skip
            middle = {chain_swarm.servers[name].peer_id for name in ("middle", "spare")}
            assert streamer.victim is not None and streamer.victim.peer_id in middle
            assert session.chain_session.failovers >= 1
            assert [h.start for h in session.chain_session.route] == [0, 3, 6]
        assert torch.equal(got, expected)
        if speculate:
            assert model.speculation_stats["accepted"] > 0
    finally:
        model.shutdown()
