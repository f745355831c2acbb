"""Servers that lie are caught (corolla.client.verification) on a swarm in one process (tests/fake_swarm.py):
a server whose blocks' outputs are perturbed, skipped or computed with another model's weights, next to an
honest replica, is caught on its first step and banned, and the session's outputs and greedy tokens are the
honest swarm's; an honest swarm sees no detection; a server that starts lying later is caught at the first check
after it starts."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from tiny_models import write_llama

from corolla.client.verification import Comparison, compare, decide, verification_stats, verifier_for
from corolla.models.stack import BlockStack


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 12, 64, generator=g)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :3] = False  # a left-padded row
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return hidden, positions, mask


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """Another random Llama of the same shape: 'another model's blocks'."""
    return write_llama(tmp_path_factory.mktemp("other") / "other-llama", seed=11)


class Tamper:
    """Makes one server's stack lie: ``kind`` "noise" (1e-2 relative noise per token), "skip" (its blocks return
    their input) or "weights" (outputs of another model's blocks), from its ``after``-th forward on."""

    def __init__(self, stack: BlockStack, kind: str, after: int = 0, other: BlockStack | None = None):
        self.stack, self.kind, self.after, self.other, self.calls = stack, kind, after, other, 0
        self.forward, self.forward_segments = stack.forward, stack.forward_segments
        stack.forward, stack.forward_segments = self.lying_forward, self.lying_segments

    def lie(self, hidden: torch.Tensor, positions, attention_mask, out: torch.Tensor, blocks) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.after:
            return out
        if self.kind == "skip":
            return hidden.to(out.dtype)
        if self.kind == "weights":  # without its context: wrong either way
            return self.other.forward(hidden, positions, attention_mask[:, -hidden.shape[1] :], None, 0, blocks)
        g = torch.Generator().manual_seed(self.calls)
        noise = torch.randn(out.shape, generator=g)
        return out + 1e-2 * noise * out.norm(dim=-1, keepdim=True) / math.sqrt(out.shape[-1])

    def lying_forward(self, hidden, positions, attention_mask, caches=None, offset=0, blocks=None):
        out = self.forward(hidden, positions, attention_mask, caches, offset, blocks)
        return self.lie(hidden, positions, attention_mask, out, blocks)

    def lying_segments(self, segments, blocks=None):
        outs = self.forward_segments(segments, blocks)
        return [self.lie(s.hidden, s.positions, s.attention_mask, out, blocks) for s, out in zip(segments, outs)]


def add_liar(swarm, peer: str, start: int, end: int, kind: str, after: int = 0, other=None, **info) -> Tamper:
    """A server of blocks [start, end) with its own stack, made to lie (the swarm's honest stack is kept)."""
    honest = swarm.stacks.pop((start, end), None)
    stack = BlockStack.load(swarm.checkpoint, start, end, dtype=torch.float32, progress=False)
    other_stack = (
        None if other is None else BlockStack.load(str(other), start, end, dtype=torch.float32, progress=False)
    )
    swarm.stacks[start, end] = stack
    try:
        swarm.add_server(peer, start, end, **info)
    finally:
        if honest is None:
            swarm.stacks.pop((start, end))
        else:
            swarm.stacks[start, end] = honest
    return Tamper(stack, kind, after, other_stack)


def _run(swarm, inputs, prefill=4):
    hidden, positions, mask = inputs
    outs = []
    with swarm.manager.open_session(max_length=16) as session:
        outs.append(session.step(hidden[:, :prefill], positions[:, :prefill], mask[:, :prefill]))
        for t in range(prefill, hidden.shape[1]):
            outs.append(session.step(hidden[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1]))
        route = [h.peer_id for h in session.route]
    return torch.cat(outs, dim=1), route


def _expected(swarm, inputs):
    hidden, positions, mask = inputs
    out = swarm.reference()(hidden, positions, mask)
    return out * mask[..., None]


def _masked(out, inputs):
    return out * inputs[2][..., None]


@pytest.mark.parametrize("kind", ["noise", "skip", "weights"])
def test_a_lying_server_is_caught_on_its_first_step_and_the_outputs_are_honest(
    make_swarm, inputs, kind, other_model
):
    swarm = make_swarm()
    add_liar(swarm, "liar", 0, 4, kind, other=other_model, latency=0.001)  # the fastest: the chain takes it
    swarm.add_server("honest", 0, 4, latency=0.01)
    swarm.add_server("b", 4, 8)
    out, route = _run(swarm, inputs)
    torch.testing.assert_close(_masked(out, inputs), _expected(swarm, inputs), atol=1e-5, rtol=0)
    assert route == ["honest", "b"] and swarm.manager.policy.is_banned("liar")
    stats = verification_stats(swarm.manager)
    assert stats["detections"] == 1 and stats["confirmed"] == 0  # two servers: the replica is trusted
    report = stats["reports"][0]
    assert (report["suspect"], report["start"], report["end"], report["first_position"]) == ("liar", 0, 4, 0)
    assert report["against"] == ("honest",) and report["error"] > report["tolerance"]


def test_a_majority_confirms_and_the_liar_is_replaced(make_swarm, inputs):
    swarm = make_swarm()
    add_liar(swarm, "liar", 0, 8, "noise", latency=0.001)
    swarm.add_server("h1", 0, 8, latency=0.01)
    swarm.add_server("h2", 0, 8, latency=0.01)
    out, route = _run(swarm, inputs)
    torch.testing.assert_close(_masked(out, inputs), _expected(swarm, inputs), atol=1e-5, rtol=0)
    stats = verification_stats(swarm.manager)
    assert stats["detections"] == 1 and stats["confirmed"] == 1 and stats["third_opinions"] == 1
    assert route in (["h1"], ["h2"]) and swarm.manager.policy.is_banned("liar")


def test_a_lying_verifier_is_outvoted_and_banned(make_swarm, inputs):
    """The chain's server is honest; the replica drawn to check it lies (it announces a huge throughput, so it is
    drawn first) and a third server sides with the chain's: the verifier is banned, the chain untouched."""
    swarm = make_swarm()
    swarm.add_server("honest", 0, 8, latency=0.001)
    add_liar(swarm, "liar", 0, 8, "noise", latency=0.05, throughput=1e9, forward_throughput=1e9)
    swarm.add_server("third", 0, 8, latency=0.05, throughput=1e-3, forward_throughput=1e-3)
    out, route = _run(swarm, inputs)
    torch.testing.assert_close(_masked(out, inputs), _expected(swarm, inputs), atol=1e-5, rtol=0)
    stats = verification_stats(swarm.manager)
    assert route == ["honest"] and stats["verifier_bans"] == 1 and stats["detections"] == 0
    assert swarm.manager.policy.is_banned("liar") and not swarm.manager.policy.is_banned("honest")


def test_a_server_that_starts_lying_later_is_caught_at_the_next_check(make_swarm, inputs):
    swarm = make_swarm(verify_fraction=1.0)
    tamper = add_liar(swarm, "liar", 4, 8, "noise", after=4, latency=0.001)  # prefill + 3 honest steps
    swarm.add_server("a", 0, 4)
    swarm.add_server("honest", 4, 8, latency=0.01)
    out, route = _run(swarm, inputs)
    torch.testing.assert_close(_masked(out, inputs), _expected(swarm, inputs), atol=1e-5, rtol=0)
    stats = verification_stats(swarm.manager)
    assert route == ["a", "honest"] and stats["detections"] == 1
    # the first lie was step 5 (positions 7): caught there, at the first position it lied about
    assert tamper.calls >= 5 and stats["reports"][0]["first_position"] == 7
    assert stats["recomputed_tokens"] == 1


def test_an_honest_swarm_sees_no_detection_and_identical_outputs(make_swarm, inputs):
    swarm = make_swarm(verify_fraction=1.0)
    swarm.add_server("a", 0, 4, latency=0.001)
    swarm.add_server("a2", 0, 4, latency=0.01)
    swarm.add_server("b", 4, 8, latency=0.001)
    swarm.add_server("b2", 4, 8, latency=0.01)
    out, route = _run(swarm, inputs)
    off = make_swarm(verify=False)
    off.add_server("a", 0, 4)
    off.add_server("b", 4, 8)
    out_off, _ = _run(off, inputs)
    assert torch.equal(out, out_off)  # checks are read-only
    stats = verification_stats(swarm.manager)
    assert stats["checks"] == 2 * 9 and stats["agreed"] == stats["checks"] and stats["detections"] == 0
    assert verification_stats(off.manager) == {}
    assert not any(swarm.manager.policy.is_banned(p) for p in ("a", "a2", "b", "b2"))


def test_int8_activations_are_compared_with_their_tolerance(make_swarm, inputs):
    swarm = make_swarm(verify_fraction=1.0, activation_compression="int8")
    swarm.add_server("a", 0, 8, latency=0.001)
    swarm.add_server("a2", 0, 8, latency=0.01)
    _run(swarm, inputs)
    stats = verification_stats(swarm.manager)
    assert stats["checks"] == 9 and stats["agreed"] == 9 and stats["detections"] == 0


def test_a_lone_server_or_another_dtype_cannot_be_checked(make_swarm, inputs):
    swarm = make_swarm()
    swarm.add_server("a", 0, 8, latency=0.001)
    swarm.add_server("other_dtype", 0, 8, latency=0.01, torch_dtype="bfloat16")
    out, route = _run(swarm, inputs)
    stats = verification_stats(swarm.manager)
    assert route == ["a"] and stats["checks"] >= 1 and stats["unverifiable"] == stats["checks"]
    assert swarm.network.dials_from.get(("client", "other_dtype"), 0) <= 1  # pinged only, never asked to check


def test_greedy_generation_through_a_liar_equals_the_honest_swarm(make_swarm, tiny_llama, local_models):
    from corolla import AutoDistributedModelForCausalLM

    local, _, _ = local_models
    swarm = make_swarm()
    add_liar(swarm, "liar", 0, 4, "noise", latency=0.001)
    swarm.add_server("honest", 0, 4, latency=0.01)
    swarm.add_server("b", 4, 8)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama), chain=swarm.manager)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(tokens, local.generate(ids, max_new_tokens=8, do_sample=False))
    assert model.verification_stats["detections"] == 1 and swarm.manager.policy.is_banned("liar")


# ---- the pure parts -----------------------------------------------------------------------------------------


def test_compare_finds_the_first_position_over_the_tolerance_on_real_tokens_only():
    ref = torch.randn(2, 5, 8)
    out = ref.clone()
    out[1, 0] += 100.0  # padding: not compared
    out[0, 3] *= 1.5
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 0] = False
    c = compare(out, ref, mask, 1e-3)
    assert c.first_position == 3 and not c.agrees and c.error == pytest.approx(0.5, rel=1e-5)
    assert compare(ref + 1e-7, ref, mask, 1e-3).agrees
    assert compare(out[:, :4], ref, mask, 1e-3).first_position == 0  # wrong shape
    nan = ref.clone()
    nan[0, 2, 0] = float("nan")
    assert compare(nan, ref, mask, 1e-3).first_position == 2


def test_the_majority_rule():
    ok = Comparison(0.0, 0.0, -1, 4, 1e-3)
    bad = Comparison(1.0, 1.0, 0, 4, 1e-3)
    assert not decide(ok, None, None).suspect_lied
    assert decide(bad, None, None) == decide(bad, bad, bad)  # no majority: against the suspect, unconfirmed
    assert decide(bad, None, None).suspect_lied and not decide(bad, None, None).confirmed
    assert decide(bad, bad, ok).suspect_lied and decide(bad, bad, ok).confirmed
    assert decide(bad, ok, bad).verifier_lied and not decide(bad, ok, bad).suspect_lied


def test_checks_are_due_on_a_hops_first_step_then_by_fraction(make_swarm):
    swarm = make_swarm(verify_fraction=0.0)
    verifier = verifier_for(swarm.manager)
    assert verifier.due(0) and not any(verifier.due(1) for _ in range(100))


def test_detections_are_published_as_owned_records(make_swarm, inputs):
    """The report goes to the sink as a signed record a client owns: kind, key per suspect, the reporter's id as
    subkey; it packs with the typed codec (what RecordStore signs) and reads back."""
    from corolla.client.verification import RecordStoreSink
    from corolla.wire.codec import pack, unpack
    from corolla.wire.reports import REPORT_KIND, REPORT_TTL, TamperReport, report_key, summarize_reports

    class Records:
        def __init__(self):
            self.stored = []

        async def store(self, kind, key, subkey, record, expiration, owned):
            self.stored.append((kind, key, subkey, record, expiration, owned))
            return True

    swarm = make_swarm()
    records = Records()
    verifier_for(swarm.manager).sink = RecordStoreSink(records, "client-peer")
    add_liar(swarm, "liar", 0, 8, "skip", latency=0.001)
    swarm.add_server("honest", 0, 8, latency=0.01)
    _run(swarm, inputs)
    swarm.manager.bridge.run(asyncio.sleep(0.05))  # publishing runs beside the session
    ((kind, key, subkey, report, expiration, owned),) = records.stored
    assert (kind, key, subkey, expiration, owned) == (
        REPORT_KIND,
        report_key("fake", "liar"),
        "client-peer",
        REPORT_TTL,
        True,
    )
    assert unpack(TamperReport, pack(report), max_tensor_bytes=0) == report
    summary = summarize_reports({"client-peer": report})
    assert (summary.reporters, summary.confirmed, summary.detections) == (1, 0, 1)


def test_histories_longer_than_a_stateless_forward_reproduces_are_not_checked(make_swarm, inputs):
    """Dynamic RoPE past the original context (configure_for_model): such histories count unverifiable, and a
    liar there is not caught (a documented limit)."""
    swarm = make_swarm()
    verifier_for(swarm.manager).max_length = 3  # shorter than the 4-token prefill
    add_liar(swarm, "liar", 0, 8, "skip", latency=0.001)
    swarm.add_server("honest", 0, 8, latency=0.01)
    _run(swarm, inputs)
    stats = verification_stats(swarm.manager)
    assert stats["detections"] == 0 and stats["unverifiable"] == stats["checks"] >= 1
