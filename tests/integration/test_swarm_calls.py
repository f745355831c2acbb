"""The swarm's calls end to end on a shared 3-server swarm: forward, inference sessions, routing,
concurrency, missing blocks and refusals, compared with the same blocks run locally."""

from __future__ import annotations

import threading

import pytest
import torch
from swarm_harness import make_manager
from tiny_models import write_llama

from corolla.wire.errors import MissingBlocksError


def _inputs(batch: int, tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, tokens, 64, generator=g)
    positions = torch.arange(tokens).expand(batch, tokens).contiguous()
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    return hidden, positions, mask


def _run_session(chain, hidden, positions, mask, prefill: int):
    session = chain.open_session(max_length=hidden.shape[1] + 4)
    try:
        outs = [session.step(hidden[:, :prefill], positions[:, :prefill], mask[:, :prefill])]
        for t in range(prefill, hidden.shape[1]):
            outs.append(session.step(hidden[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1]))
        return torch.cat(outs, dim=1), session.route
    finally:
        session.close()


def test_forward_matches_local_blocks(manager, local_stack):
    hidden, positions, mask = _inputs(2, 7, seed=1)
    expected = local_stack(hidden, positions, mask)
    assert torch.allclose(manager.forward(hidden, positions, mask), expected, atol=1e-5)
    # a sub-range of blocks, as model.model.layers[a:b] would ask
    part = local_stack(hidden, positions, mask, None, 0, (2, 5))
    assert torch.allclose(manager.forward(hidden, positions, mask, 2, 5), part, atol=1e-5)


def test_inference_session_matches_local(manager, local_stack):
    hidden, positions, mask = _inputs(1, 9, seed=2)
    expected = local_stack(hidden, positions, mask)
    out, route = _run_session(manager, hidden, positions, mask, prefill=5)
    assert torch.allclose(out, expected, atol=1e-5)
    assert route[0].start == 0 and route[-1].end == 8
    assert all(a.end == b.start for a, b in zip(route, route[1:]))


def test_show_route_names_servers(manager):
    text = manager.show_route()
    assert "[0:" in text and ":8)" in text
    assert any(name in text for name in ("s0", "s1", "s2"))


def test_concurrent_sessions_get_their_own_results(manager, local_stack):
    inputs = [_inputs(1 + i % 2, 6, seed=10 + i) for i in range(4)]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            results[i] = _run_session(manager, *inputs[i], prefill=2)[0]
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, (hidden, positions, mask) in enumerate(inputs):
        assert torch.allclose(results[i], local_stack(hidden, positions, mask), atol=1e-5), f"session {i}"


def test_missing_blocks_error_names_blocks(shared_swarm, tiny_llama):
    m = make_manager(
        tiny_llama, shared_swarm.initial_peers, dht_prefix="nobody-serves-this", missing_blocks_timeout=1
    )
    try:
        with pytest.raises(MissingBlocksError) as info:
            m.forward(*_inputs(1, 2, seed=3))
        assert "0-7" in str(info.value) and "nobody-serves-this" in str(info.value)
        assert info.value.blocks == list(range(8))
    finally:
        m.shutdown()


def test_client_of_another_config_is_refused_with_reason(shared_swarm, tmp_path):
    other = write_llama(tmp_path / "tiny-llama", rms_norm_eps=1e-3)  # same name, different model
    m = make_manager(other, shared_swarm.initial_peers, missing_blocks_timeout=1)
    try:
        with pytest.raises(MissingBlocksError) as info:
            m.forward(*_inputs(1, 2, seed=4))
        assert "config hash" in str(info.value)
    finally:
        m.shutdown()


def test_sigterm_announces_offline_and_exits(shared_swarm, tiny_llama):
    import os
    import signal

    from corolla.wire.records import ServerState

    # its own DHT prefix, so the shared swarm's other clients never route through it
    proc = shared_swarm.start_server("leaver", tiny_llama, "--block_indices", "0:2", "--dht_prefix", "leaving",
                                     wait=False)  # fmt: skip
    shared_swarm.wait_state(proc, ServerState.ONLINE, "leaving")
    os.kill(proc.pid, signal.SIGTERM)
    shared_swarm.wait_state(proc, ServerState.OFFLINE, "leaving", timeout=30)
    assert proc.wait(30) == 0


def test_num_blocks_takes_the_least_served_span(shared_swarm, tiny_llama):
    from corolla.wire.records import ServerState

    first = shared_swarm.start_server("auto1", tiny_llama, "--num_blocks", "3", "--dht_prefix", "autoplace",
                                      wait=False)  # fmt: skip
    info = shared_swarm.wait_state(first, ServerState.ONLINE, "autoplace")
    assert (info.start, info.end) == (0, 3)  # nothing served yet: the first span
    second = shared_swarm.start_server("auto2", tiny_llama, "--num_blocks", "3", "--dht_prefix", "autoplace",
                                       wait=False)  # fmt: skip
    info = shared_swarm.wait_state(second, ServerState.ONLINE, "autoplace")
    assert (info.start, info.end) == (3, 6)  # the first span with no server
    # the second server found the first and probed its bandwidth; the first, alone at its start, has no
    # network figure and announces its compute throughput, not an unknown network as a bottleneck
    assert info.network_throughput > 0
    first_info = shared_swarm.wait_state(first, ServerState.ONLINE, "autoplace")
    assert first_info.network_throughput == 0 and first_info.throughput > 0


def test_bfloat16_server_gets_compressed_activations(shared_swarm, tiny_llama):
    from corolla.models.stack import BlockStack
    from corolla.wire.records import ServerState

    proc = shared_swarm.start_server("bf16", tiny_llama, "--block_indices", "0:8", "--dht_prefix", "bf16",
                                     "--torch_dtype", "bfloat16", wait=False)  # fmt: skip
    info = shared_swarm.wait_state(proc, ServerState.ONLINE, "bf16")
    assert info.torch_dtype == "bfloat16"
    manager = make_manager(tiny_llama, shared_swarm.initial_peers, dht_prefix="bf16")
    try:
        hidden, positions, mask = _inputs(1, 6, seed=5)
        out, _ = _run_session(manager, hidden, positions, mask, prefill=3)
        assert out.dtype == torch.float32  # the client gets its own dtype back
        local = BlockStack.load(str(tiny_llama), 0, 8, dtype=torch.bfloat16)
        expected = local(hidden.bfloat16(), positions, mask).float()
        assert torch.allclose(out, expected, atol=2e-2, rtol=2e-2)
    finally:
        manager.shutdown()


def test_petals_style_remote_sequential_from_a_config(shared_swarm, tiny_llama, local_stack):
    """Petals scripts build the blocks from `AutoDistributedConfig` (and a hivemind DHT object) rather than
    from a model: whole-chain and sliced forwards and a sliced session, equal to the local blocks."""
    from hivemind import DHT

    from corolla import AutoDistributedConfig, RemoteSequential

    config = AutoDistributedConfig.from_pretrained(tiny_llama, initial_peers=shared_swarm.initial_peers)
    assert config.initial_peers == list(shared_swarm.initial_peers) and config.num_hidden_layers == 8
    hidden, positions, mask = _inputs(1, 6, seed=9)
    sequential = RemoteSequential(config)
    try:
        torch.testing.assert_close(sequential(hidden), local_stack(hidden, positions, mask), atol=1e-5, rtol=0)
        middle = sequential[3:6]
        expected = local_stack(hidden, positions, mask, None, 0, (3, 6))
        torch.testing.assert_close(middle(hidden), expected, atol=1e-5, rtol=0)
        with middle.inference_session(max_length=8) as session:
            steps = torch.cat([session.step(hidden[:, :4]), session.step(hidden[:, 4:])], dim=1)
        torch.testing.assert_close(steps, expected, atol=1e-5, rtol=0)
    finally:
        sequential.chain.shutdown()
    dht = DHT(initial_peers=config.initial_peers, client_mode=True, start=True)
    try:
        blocks = RemoteSequential(config, dht=dht, start_block=3, end_block=6)
        try:
            torch.testing.assert_close(blocks(hidden), expected, atol=1e-5, rtol=0)
        finally:
            blocks.chain.shutdown()
    finally:
        dht.shutdown()
