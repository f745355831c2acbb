"""Fine-tuning through a real swarm: remote backward, prompt tuning, retries, bad gradients.

Every comparison is in fp32 with a local computation on the same checkpoint: the same corolla blocks
run in-process (``run_blocks``) and transformers' LlamaForCausalLM (``inputs_embeds``, deep prompts added
by hooks). Tests that do not kill servers share the session swarm (s0 [0:4), s1 [3:8), s2 [2:6)); the
failure test starts its own swarm with replicas ([0:8) twice, [0:4), [4:8)).
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from ptune_reference import reference_greedy
from swarm_harness import Swarm
from transformers import LlamaForCausalLM

from corolla.client import remote_autograd
from corolla.client.classification import AutoDistributedModelForSequenceClassification
from corolla.client.local_chain import LocalChain
from corolla.client.model import AutoDistributedModelForCausalLM
from corolla.models.deep_prompts import run_blocks
from corolla.models.stack import BlockStack
from corolla.wire.errors import BadRequestError
from corolla.wire.messages import BackwardRequest, BackwardResponse, ForwardResponse, TrainForwardRequest
from corolla.wire.records import ServerState

K = 3


def _batch(seed: int, batch: int = 3, length: int = 6):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, 64, generator=g)
    deep = 0.3 * torch.randn(8, 1, K, 64, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, :2] = False  # one left-padded row
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    weights = torch.randn(batch, length, 64, generator=g)
    return hidden, deep, positions, mask, weights


def _grads(run, hidden, deep, weights):
    hidden, deep = hidden.clone().requires_grad_(True), deep.clone().requires_grad_(True)
    out = run(hidden, deep)
    (out * weights).sum().backward()
    return out.detach(), hidden.grad, deep.grad


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture
def small_chunks(monkeypatch):
    """Two rows per chunk: the batch is split and chunks run concurrently."""
    monkeypatch.setattr(remote_autograd, "CHUNK_TOKENS", 12)


def test_swarm_gradients_equal_local_blocks(manager, local_stack, small_chunks):
    hidden, deep, positions, mask, weights = _batch(0)
    ours = _grads(lambda h, d: manager.forward(h, positions, mask, 0, 8, prompts=d), hidden, deep, weights)
    theirs = _grads(lambda h, d: run_blocks(local_stack, (0, 8), h, positions, mask, d), hidden, deep, weights)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert ours[2].abs().sum() > 0
    # a sub-range (the spans cross server boundaries) and no prompts
    sub = _grads(lambda h, d: manager.forward(h, positions, mask, 2, 7), hidden, deep, weights)
    ref = _grads(lambda h, d: local_stack(h, positions, mask, None, 0, (2, 7)), hidden, deep, weights)
    torch.testing.assert_close(sub[1], ref[1], atol=1e-4, rtol=0)


def test_input_embedding_gradients_equal_transformers(shared_swarm, tiny_llama, reference):
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=shared_swarm.initial_peers)
    try:
        ids = torch.randint(3, 320, (2, 7), generator=torch.Generator().manual_seed(1))
        embeds = reference.model.embed_tokens(ids).detach()
        ours_in, theirs_in = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
        ours = model(inputs_embeds=ours_in, labels=ids)
        theirs = reference(inputs_embeds=theirs_in, labels=ids)
        ours.loss.backward()
        theirs.loss.backward()
        torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-5, rtol=1e-4)
    finally:
        model.shutdown()


def _ptune_models(tiny_llama, initial_peers, mode: str):
    """The same prompt-tuned model on the swarm and on an in-process chain, with equal non-zero prompts."""
    stack = BlockStack.load(str(tiny_llama), 0, 8, dtype=torch.float32, progress=False)
    local = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, chain=LocalChain(stack), tuning_mode=mode, pre_seq_len=K
    )
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=initial_peers, tuning_mode=mode, pre_seq_len=K, update_period=1.0
    )
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(5)
        for p in local.ptune.parameters():
            p.normal_(0, 0.3)
    remote.ptune.load_state_dict(local.ptune.state_dict())
    return local, remote


def _train(model, steps: int, ids, labels, mask):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_tuning_steps_equal_local_and_generation(shared_swarm, tiny_llama, reference, mode):
    local, remote = _ptune_models(tiny_llama, shared_swarm.initial_peers, mode)
    try:
        ids = torch.randint(3, 320, (4, 6), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        labels = ids.masked_fill(mask == 0, -100)
        theirs = _train(local, 3, ids, labels, mask)
        ours = _train(remote, 3, ids, labels, mask)
        assert ours == pytest.approx(theirs, abs=1e-5)
        assert ours[-1] < ours[0]
        for (name, a), b in zip(remote.ptune.named_parameters(), local.ptune.parameters()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)

        # generation with the trained prompts: token-exact with transformers + the same prompts
        prompt_ids = ids[:2, 1:]
        out = remote.generate(prompt_ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
        deep = remote.ptune.deep_prompts()
        expected = reference_greedy(
            reference,
            prompt_ids,
            remote.ptune.prompts()[0].detach(),
            None if deep is None else deep[:, 0].detach(),
            5,
        )
        assert out.tolist() == expected.tolist()
    finally:
        remote.shutdown()


def test_classifier_step_equals_local(shared_swarm, tiny_llama):
    stack = BlockStack.load(str(tiny_llama), 0, 8, dtype=torch.float32, progress=False)
    options = dict(num_labels=3, tuning_mode="deep_ptune", pre_seq_len=K)
    local = AutoDistributedModelForSequenceClassification.from_pretrained(
        tiny_llama, chain=LocalChain(stack), **options
    )
    remote = AutoDistributedModelForSequenceClassification.from_pretrained(
        tiny_llama, initial_peers=shared_swarm.initial_peers, **options
    )
    try:
        remote.load_state_dict(local.state_dict())
        ids = torch.randint(3, 320, (3, 6), generator=torch.Generator().manual_seed(8))
        ids[0, 4:] = 0  # right padding: pooled at the last real token
        labels = torch.tensor([0, 2, 1])
        for model in (local, remote):
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
            model(ids, attention_mask=(ids != 0).long(), labels=labels).loss.backward()
            optimizer.step()
        for (name, a), b in zip(remote.named_parameters(), local.parameters()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
        assert remote.ptune.intermediate_prompt_embeddings.weight.grad.abs().sum() > 0
    finally:
        remote.shutdown()


def test_bad_gradients_are_refused_and_the_server_keeps_serving(manager, shared_swarm):
    peer, run = shared_swarm.servers["s0"].peer_id, manager.bridge.run
    hidden, deep, positions, mask, _ = _batch(3)

    def backward(grad, prompts=None):
        request = BackwardRequest(manager.model, 0, 4, hidden, positions, mask, grad, prompts)
        return run(manager.transport.call(peer, request, BackwardResponse, 30))

    with pytest.raises(BadRequestError, match="grad_output must be floating point with the shape of hidden"):
        backward(torch.randn(3, 5, 64))
    with pytest.raises(BadRequestError, match="grad_output must be"):
        backward(torch.ones(3, 6, 64, dtype=torch.int64))
    with pytest.raises(BadRequestError, match="prompts must be floating point"):
        backward(torch.randn(3, 6, 64), deep[:3])  # prompts for 3 blocks, span has 4
    with pytest.raises(BadRequestError, match="prompt tokens do not fit"):
        backward(torch.randn(3, 6, 64), torch.randn(4, 1, 7, 64))
    with pytest.raises(BadRequestError, match="graph_id must be at most 64 bytes"):
        request = BackwardRequest(
            manager.model, 0, 4, hidden, positions, mask, torch.randn(3, 6, 64), None, graph_id=b"x" * 65
        )
        run(manager.transport.call(peer, request, BackwardResponse, 30))
    with pytest.raises(BadRequestError, match="not within this server's blocks"):
        request = TrainForwardRequest(manager.model, 0, 6, hidden, positions, mask, None)
        run(manager.transport.call(peer, request, ForwardResponse, 30))
    good = backward(torch.randn(3, 6, 64), deep[:4])
    assert good.grad_hidden.shape == (3, 6, 64) and good.grad_prompts.shape == (4, 1, K, 64)
    # the server never trains its own weights: a second identical backward gives identical gradients
    again = backward(torch.ones(3, 6, 64), deep[:4])
    assert torch.equal(backward(torch.ones(3, 6, 64), deep[:4]).grad_hidden, again.grad_hidden)


class _KillRouteAfter:
    """A generate streamer that SIGKILLs every server of the session's chain after ``n`` new tokens."""

    def __init__(self, session, by_peer: dict, n: int):
        self.session, self.by_peer, self.n, self.puts, self.victims = session, by_peer, n, 0, []

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == self.n + 1:  # the first put is the prompt
            self.victims = [self.by_peer[hop.peer_id] for hop in self.session.chain_session.inner.route]
            for proc in self.victims:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)

    def end(self) -> None:
        pass


def _covering_victims(used: set[str], alive: dict[str, tuple[int, int]]) -> list[str]:
    """Servers among ``used`` to kill such that the rest of ``alive`` still covers blocks [0, 8)."""
    victims = []
    for peer in sorted(used):
        rest = [span for p, span in alive.items() if p != peer and p not in victims]
        if all(any(a <= b < e for a, e in rest) for b in range(8)):
            victims.append(peer)
    return victims


def test_servers_killed_mid_generation_and_between_forward_and_backward(
    processes, tiny_llama, tmp_path, local_stack, reference
):
    """Replicas: deep-prompted generation survives its chain's death (the replay carries the prompts), then
    a training step whose forward servers die before its backward gives the local gradients."""
    swarm = Swarm(processes, tmp_path)
    swarm.start_dht()
    spans = {"full": (0, 8), "full2": (0, 8), "head": (0, 4), "tail": (4, 8)}
    for name, (a, b) in spans.items():
        swarm.start_server(name, tiny_llama, "--block_indices", f"{a}:{b}", wait=False)
    for proc in swarm.servers.values():
        swarm.wait_state(proc, ServerState.ONLINE, "tiny-llama")
    by_peer = {proc.peer_id: proc for proc in swarm.servers.values()}
    alive = {swarm.servers[name].peer_id: span for name, span in spans.items()}
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=swarm.initial_peers, tuning_mode="deep_ptune", pre_seq_len=K, update_period=1.0
    )
    manager = model.chain
    try:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(7)
            for p in model.ptune.parameters():
                p.normal_(0, 0.3)
        ids = torch.randint(3, 320, (2, 5), generator=torch.Generator().manual_seed(6))
        with model.inference_session(max_length=16) as session:
            streamer = _KillRouteAfter(session, by_peer, n=3)
            out = model.generate(
                ids, session=session, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
                streamer=streamer,
            )  # fmt: skip
            assert streamer.victims and session.chain_session.inner.failovers >= 1
        prompts, deep = model.ptune.prompts()[0].detach(), model.ptune.deep_prompts()[:, 0].detach()
        assert out.tolist() == reference_greedy(reference, ids, prompts, deep, 6).tolist()
        for proc in streamer.victims:
            alive.pop(proc.peer_id)

        hidden, deep, positions, mask, weights = _batch(4)
        h, d = hidden.clone().requires_grad_(True), deep.clone().requires_grad_(True)
        out = manager.forward(h, positions, mask, 0, 8, prompts=d)
        used = {span.peer for chunk in out.grad_fn.chunks for span in chunk.spans}
        victims = _covering_victims(used, alive)
        assert victims, f"the forward used {used}, and killing any of them would leave blocks uncovered"
        for peer in victims:
            os.killpg(by_peer[peer].pid, signal.SIGKILL)
            by_peer[peer].wait(30)
        (out * weights).sum().backward()
        theirs = _grads(lambda x, y: run_blocks(local_stack, (0, 8), x, positions, mask, y), hidden, deep, weights)
        torch.testing.assert_close(out.detach(), theirs[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(h.grad, theirs[1], atol=1e-4, rtol=0)
        torch.testing.assert_close(d.grad, theirs[2], atol=1e-4, rtol=0)
        assert all(manager.policy.is_banned(peer) for peer in victims)
    finally:
        model.shutdown()
        swarm.close()
