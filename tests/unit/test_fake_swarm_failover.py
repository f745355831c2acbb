"""Failover, bans, retries and waits on a swarm in one process (tests/fake_swarm.py): real server handlers and
backends, the real client, faults injected per peer. No subprocess, no p2pd: each test takes about a second."""

from __future__ import annotations

import pytest
import torch

from corolla.wire.errors import ChainFailedError, MissingBlocksError, SessionLengthError


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 12, 64, generator=g)
    positions = torch.arange(12).expand(2, 12).contiguous()
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :3] = False  # a left-padded row: replays must carry masks and positions exactly
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return hidden, positions, mask


def _generate(swarm, inputs, fault_at=None, fault=None, prefill=4):
    """A 4-token prefill then one-token steps; ``fault()`` runs before step ``fault_at``."""
    hidden, positions, mask = inputs
    outs = []
    with swarm.manager.open_session(max_length=16) as session:
        outs.append(session.step(hidden[:, :prefill], positions[:, :prefill], mask[:, :prefill]))
        for t in range(prefill, hidden.shape[1]):
            if t == fault_at:
                fault(session)
            outs.append(session.step(hidden[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1]))
        route, names = session.route, [h.name for h in session.describe_route()]
    return torch.cat(outs, dim=1), route, names, session.failovers


def _expected(swarm, inputs):
    hidden, positions, mask = inputs
    return swarm.reference()(hidden, positions, mask)


def test_dead_server_is_replaced_and_its_history_replayed(make_swarm, inputs):
    swarm = make_swarm()
    swarm.add_server("a", 0, 4, latency=0.001)
    swarm.add_server("b", 0, 4, latency=0.01)
    swarm.add_server("c", 4, 8)
    dials = {}

    def kill_first(session):
        dials.update(swarm.network.dials_from)
        swarm.kill(session.route[0].peer_id)

    out, route, names, failovers = _generate(swarm, inputs, fault_at=7, fault=kill_first)
    torch.testing.assert_close(out, _expected(swarm, inputs), atol=1e-5, rtol=0)
    assert failovers == 1 and [h.peer_id for h in route] == ["b", "c"]
    assert swarm.manager.policy.is_banned("a")
    # the downstream hop was untouched: the client opened no new stream to it
    assert swarm.network.dials_from["client", "c"] == dials["client", "c"]


def test_stalled_server_is_detected_by_deadline_and_ping(make_swarm, inputs):
    swarm = make_swarm()
    swarm.add_server("a", 0, 8, latency=0.001)
    swarm.add_server("b", 0, 8, latency=0.01)
    out, route, names, failovers = _generate(swarm, inputs, fault_at=6, fault=lambda s: swarm.stall("a"))
    torch.testing.assert_close(out, _expected(swarm, inputs), atol=1e-5, rtol=0)
    assert failovers == 1 and [h.peer_id for h in route] == ["b"]
    assert swarm.manager.policy.is_banned("a")


def test_a_slow_but_live_server_is_waited_for(make_swarm, inputs):
    """A missed deadline alone condemns nobody: the server answers its ping, so the client keeps waiting."""
    swarm = make_swarm(ping_timeout=1.0)  # the ping outlasts the pause
    swarm.add_server("a", 0, 8)

    def pause(session):
        swarm.stall("a")
        swarm.later(0.5, swarm.network.resume, "a")  # longer than a deadline, answers the ping in time

    out, route, names, failovers = _generate(swarm, inputs, fault_at=6, fault=pause)
    torch.testing.assert_close(out, _expected(swarm, inputs), atol=1e-5, rtol=0)
    assert failovers == 0 and not swarm.manager.policy.is_banned("a")


def test_a_busy_server_that_misses_one_ping_is_not_banned(make_swarm, inputs):
    """Under load a ping can be late: the first one times out (0.2 s), the second chance (4x) is answered once
    the server resumes; the client waits instead of banning it."""
    swarm = make_swarm()  # ping_timeout 0.2 s, step deadline 0.2 s
    swarm.add_server("a", 0, 8)
    swarm.add_server("b", 0, 8, latency=0.05)  # a replica the client would fail over to if it gave up on a

    def pause(session):
        swarm.stall("a")
        swarm.later(0.5, swarm.network.resume, "a")  # past the deadline and the first ping, within the second

    out, route, names, failovers = _generate(swarm, inputs, fault_at=6, fault=pause)
    torch.testing.assert_close(out, _expected(swarm, inputs), atol=1e-5, rtol=0)
    assert failovers == 0 and not swarm.manager.policy.is_banned("a")
    assert [h.peer_id for h in route] == ["a"]


def test_a_server_stalled_before_the_open_is_answered_is_replaced(make_swarm, inputs):
    """The open rides with the first step: a server that never answers it is caught by the step's deadline."""
    swarm = make_swarm()
    swarm.add_server("a", 0, 4, latency=0.001)
    swarm.add_server("b", 4, 8, latency=0.001)
    swarm.add_server("b2", 4, 8, latency=0.01)
    swarm.stall("b")
    out, route, names, failovers = _generate(swarm, inputs)
    torch.testing.assert_close(out, _expected(swarm, inputs), atol=1e-5, rtol=0)
    assert [h.peer_id for h in route] == ["a", "b2"] and swarm.manager.policy.is_banned("b")


def test_a_refused_open_raises_the_servers_error(make_swarm, inputs):
    """A server that refuses the session (too long for it) answers the open with an error; the client raises
    that error (fatal: no ban, no retry), although it had already sent the first step."""
    swarm = make_swarm()
    swarm.add_server("a", 0, 4)
    swarm.add_server("b", 4, 8, inference_max_length=8)
    with pytest.raises(SessionLengthError, match="inference_max_length"):
        _generate(swarm, inputs)
    assert not swarm.manager.policy.is_banned("b")


def test_route_change_mid_session_splits_a_span(make_swarm, inputs):
    """The replacement of one hop may be several servers; the step goes on through all of them."""
    swarm = make_swarm()
    swarm.add_server("whole", 0, 8, latency=0.001)
    swarm.add_server("left", 0, 3, latency=0.01)
    swarm.add_server("right", 3, 8, latency=0.01)
    out, route, names, failovers = _generate(swarm, inputs, fault_at=5, fault=lambda s: swarm.kill("whole"))
    torch.testing.assert_close(out, _expected(swarm, inputs), atol=1e-5, rtol=0)
    assert [(h.peer_id, h.start, h.end) for h in route] == [("left", 0, 3), ("right", 3, 8)]
    assert names == ["left", "right"]


def test_banned_server_is_used_again_when_it_is_the_only_one_and_answers(make_swarm, inputs):
    swarm = make_swarm()
    swarm.add_server("a", 0, 8, latency=0.001)
    swarm.add_server("b", 0, 8, latency=0.01)

    def faults(session):
        swarm.stall("a")  # a is banned, b takes over ...
        swarm.later(1.5, swarm.network.resume, "a")  # silent past the deadline and both pings (1.2 s)

    hidden, positions, mask = inputs
    out, route, names, failovers = _generate(swarm, inputs, fault_at=5, fault=faults)
    assert swarm.manager.policy.is_banned("a") and [h.peer_id for h in route] == ["b"]
    # ... then b dies: a is banned but the only server left, answers a ping, and gets the session's history
    with swarm.manager.open_session(max_length=16) as again:
        first = again.step(hidden[:, :6], positions[:, :6], mask[:, :6])
        swarm.kill("b")
        rest = again.step(hidden[:, 6:], positions[:, 6:], mask[:, 6:])
        assert [h.peer_id for h in again.route] == ["a"] and not swarm.manager.policy.is_banned("a")
    torch.testing.assert_close(torch.cat([first, rest], dim=1), _expected(swarm, inputs), atol=1e-5, rtol=0)


def test_missing_blocks_wait_is_bounded(make_swarm, inputs):
    swarm = make_swarm(missing_blocks_timeout=0.5)
    swarm.add_server("a", 0, 4)
    swarm.add_server("b", 4, 8)
    hidden, positions, mask = inputs
    with swarm.manager.open_session(max_length=16) as session:
        session.step(hidden[:, :4], positions[:, :4], mask[:, :4])
        swarm.kill("b")
        with pytest.raises(MissingBlocksError) as error:
            session.step(hidden[:, 4:5], positions[:, 4:5], mask[:, 4:5])
    assert error.value.blocks == [4, 5, 6, 7]


def test_a_server_that_joins_during_the_wait_is_used(make_swarm, inputs):
    swarm = make_swarm(missing_blocks_timeout=10.0)
    swarm.add_server("a", 0, 4)
    swarm.add_server("b", 4, 8)

    def replace(session):
        swarm.kill("b")
        swarm.later(0.3, swarm.add_server, "late", 4, 8)  # appears in the records while the client waits

    out, route, names, failovers = _generate(swarm, inputs, fault_at=6, fault=replace)
    torch.testing.assert_close(out, _expected(swarm, inputs), atol=1e-5, rtol=0)
    assert [h.peer_id for h in route] == ["a", "late"]


def test_retries_are_capped(make_swarm, inputs):
    """Servers that answer pings but fail every call: ChainFailedError after max_retries, not a loop."""
    swarm = make_swarm(max_retries=2)
    for peer in ("x", "y"):
        swarm.add_broken_server(peer, 0, 8)
    hidden, positions, mask = inputs
    with pytest.raises(ChainFailedError, match="after 3 failures"):
        swarm.manager.forward(hidden, positions, mask)


def test_training_forward_and_backward_fail_over(make_swarm, inputs):
    """The server that ran a span's forward dies before the backward: the span is retried on a replica and
    the gradients equal the local ones."""
    swarm = make_swarm()
    swarm.add_server("a", 0, 8, throughput=1e6)
    swarm.add_server("b", 0, 8, throughput=1.0)
    hidden, positions, mask = inputs
    leaf = hidden.clone().requires_grad_(True)
    out = swarm.manager.forward(leaf, positions, mask)
    assert {span.peer for chunk in out.grad_fn.chunks for span in chunk.spans} == {"a"}
    swarm.kill("a")
    (out * out).sum().backward()
    ref_leaf = hidden.clone().requires_grad_(True)
    ref = swarm.reference()(ref_leaf, positions, mask)
    (ref * ref).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, atol=1e-4, rtol=0)
