"""LoRA through a real swarm: served adapters (``--adapters``) and client-owned LoRA training.

One module swarm: server ``with`` hosts all blocks and serves the adapter ``tiny-lora``, server
``without`` hosts all blocks and serves none. Both accept client adapters up to a small bound.
References are transformers + peft on the same checkpoint.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from swarm_harness import Swarm
from transformers import LlamaForCausalLM

from corolla import AutoDistributedModelForCausalLM
from corolla.client.lora import RemoteLora
from corolla.wire.errors import AdapterLimitError, BadRequestError, UnknownAdapterError
from corolla.wire.messages import (
    ForwardRequest,
    ForwardResponse,
    InferenceOpen,
    InferenceOpened,
    LoraReleaseRequest,
    LoraReleaseResponse,
    LoraTensors,
    LoraUploadRequest,
    LoraUploadResponse,
)
from corolla.wire.records import ServerState

ADAPTER = "tiny-lora"
CLIENT_BYTES = 256 * 1024  # room for a rank-4 LoRA of every block of tiny_llama, not for rank 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapter_dir(reference, tmp_path_factory):
    """A PEFT adapter with random A and B (so that it changes the output), saved as safetensors."""
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    model = get_peft_model(copy.deepcopy(reference), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("adapter") / ADAPTER
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def merged(reference, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(reference), adapter_dir).merge_and_unload().eval()


@pytest.fixture(scope="module")
def swarm(session_processes, tiny_llama, adapter_dir, tmp_path_factory):
    groups = type(session_processes)(tmp_path_factory.mktemp("lora-logs"))  # reaped at module end
    swarm = Swarm(groups, tmp_path_factory.mktemp("lora-swarm"))
    try:
        swarm.start_dht()
        common = (
            "--block_indices",
            "0:8",
            "--max_client_adapter_bytes",
            str(CLIENT_BYTES),
            "--balance_period",
            "0",
        )
        swarm.start_server("with", tiny_llama, *common, "--adapters", f"{ADAPTER}={adapter_dir}", wait=False)
        swarm.start_server("without", tiny_llama, *common, wait=False)
        for proc in swarm.servers.values():
            swarm.wait_state(proc, ServerState.ONLINE, "tiny-llama")
        yield swarm
    finally:
        swarm.close()
        groups.kill_all()


@pytest.fixture(scope="module")
def model(swarm, tiny_llama):
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=swarm.initial_peers)
    yield model
    model.shutdown()


def _prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 320, (1, length), generator=torch.Generator().manual_seed(seed))


# --- served adapters ------------------------------------------------------------------------------------


def test_servers_announce_their_adapters(swarm):
    infos = swarm.records("tiny-llama", 8)[0]
    assert infos[swarm.servers["with"].peer_id].adapters == (ADAPTER,)
    assert infos[swarm.servers["without"].peer_id].adapters == ()


def test_generate_with_active_adapter_is_token_exact(model, merged, reference):
    ids = _prompt(12, seed=1)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    expected = merged.generate(ids, **kwargs)
    assert not torch.equal(expected, reference.generate(ids, **kwargs)), "the adapter should change the output"
    assert torch.equal(model.generate(ids, active_adapter=ADAPTER, **kwargs), expected)
    # and the base model again, on the same client
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_logits_and_session_route_use_only_adapter_servers(model, merged, swarm):
    from corolla.client.active_adapter import using_adapter

    ids = _prompt(10, seed=2)
    with torch.no_grad(), using_adapter(ADAPTER):
        logits = model(ids).logits
    torch.testing.assert_close(logits, merged(ids).logits, atol=1e-4, rtol=0)
    with_peer = swarm.servers["with"].peer_id
    for _ in range(3):  # the server without the adapter is as good a route for the base model: never chosen
        with model.inference_session(max_length=16, active_adapter=ADAPTER) as session:
            out = model.generate(ids[:, :4], max_new_tokens=2, do_sample=False, session=session)
            assert [hop.peer_id for hop in session.chain_session.route] == [with_peer]
        assert out.shape[1] == 6


def test_from_pretrained_active_adapter(swarm, tiny_llama, merged):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=swarm.initial_peers, active_adapter=ADAPTER
    )
    try:
        ids = _prompt(8, seed=3)
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        assert model.config.active_adapter == ADAPTER
        assert torch.equal(model.generate(ids, **kwargs), merged.generate(ids, **kwargs))
    finally:
        model.shutdown()


def test_config_active_adapter_is_obeyed(swarm, tiny_llama, merged, reference):
    """Petals scripts switch adapters with `model.config.active_adapter = NAME` (None: the base model): the
    switch takes effect for generate, forward and new sessions, never silently ignored."""
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=swarm.initial_peers)
    try:
        ids = _prompt(8, seed=5)
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        base = reference.generate(ids, **kwargs)
        assert torch.equal(model.generate(ids, **kwargs), base)
        model.config.active_adapter = ADAPTER
        assert torch.equal(model.generate(ids, **kwargs), merged.generate(ids, **kwargs))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, merged(ids).logits, atol=1e-4, rtol=0)
        with model.inference_session(max_length=32) as session:
            assert session.chain_session.adapter == ADAPTER
        model.config.active_adapter = None
        assert torch.equal(model.generate(ids, **kwargs), base)
    finally:
        model.shutdown()


def test_unknown_adapter_is_a_clear_error(model, swarm):
    ids = _prompt(6, seed=4)
    with pytest.raises(UnknownAdapterError, match="nope.*tiny-lora"):
        model.generate(ids, active_adapter="nope", max_new_tokens=2)
    # asked directly, a server names the adapter, and keeps serving
    manager = model.chain
    peer = swarm.servers["with"].peer_id
    hidden = torch.randn(1, 3, 64)
    positions, mask = torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool)

    async def ask(adapter):
        request = ForwardRequest(manager.model, 0, 8, hidden, positions, mask, adapter=adapter)
        return await manager.transport.call(peer, request, ForwardResponse, 30)

    with pytest.raises(UnknownAdapterError, match="'nope' is not served here.*tiny-lora"):
        manager.bridge.run(ask("nope"))
    with pytest.raises(UnknownAdapterError, match="'nope'"):
        manager.bridge.run(
            manager.transport.call(
                peer,
                InferenceOpen(manager.model, 0, 8, 8, 1, adapter="nope"),
                InferenceOpened,
                30,
            )
        )
    base, adapted = manager.bridge.run(ask("")), manager.bridge.run(ask(ADAPTER))
    assert base.hidden.shape == adapted.hidden.shape == (1, 3, 64)
    assert not torch.allclose(base.hidden, adapted.hidden)


def test_client_adapter_over_the_bound_is_refused(model, swarm):
    manager = model.chain
    peer = swarm.servers["without"].peer_id

    def upload(rank, name="big", target="self_attn.q_proj", in_features=64, b_rows=64):
        weights = tuple(
            LoraTensors(i, target, torch.zeros(rank, in_features), torch.zeros(b_rows, rank)) for i in range(8)
        )
        request = LoraUploadRequest(manager.model, name, 0, 8, 1.0, weights)
        return manager.bridge.run(manager.transport.call(peer, request, LoraUploadResponse, 30))

    with pytest.raises(AdapterLimitError, match="over the limit of 262144 bytes"):
        upload(rank=100, target="mlp.down_proj", in_features=160)
    with pytest.raises(BadRequestError, match="B \\[64, r\\]"):
        upload(rank=4, b_rows=63)
    with pytest.raises(BadRequestError, match="no linear layer 'self_attn.nope'"):
        upload(rank=4, target="self_attn.nope")
    assert upload(rank=4, name="small").stored_bytes == 8 * (4 * 64 + 64 * 4) * 4
    release = LoraReleaseRequest(manager.model, "small")
    assert manager.bridge.run(manager.transport.call(peer, release, LoraReleaseResponse, 30)).released
    # the server still serves
    ids = _prompt(5, seed=5)
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 5, 320)


# --- client-owned LoRA training ---------------------------------------------------------------------------


@pytest.fixture
def peft_init(reference, tmp_path):
    """A PEFT LoRA on every target with random A and B, saved: the common starting point."""
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(reference), config)
    peft_model.save_pretrained(tmp_path / "init", safe_serialization=True)
    return peft_model, tmp_path / "init"


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 320, (4, 8), generator=torch.Generator().manual_seed(100 + step))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    return ids, mask


def test_client_lora_trains_like_peft_then_is_served(
    swarm, tiny_llama, reference, peft_init, tmp_path, monkeypatch
):
    import corolla.client.lora as client_lora
    import corolla.client.remote_autograd as remote_autograd

    monkeypatch.setattr(remote_autograd, "CHUNK_TOKENS", 16)  # 2 rows per chunk: the batch of 4 goes as 2 chunks
    peft_model, init = peft_init
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=swarm.initial_peers)
    try:
        lora = client_lora.RemoteLora.attach(model, path=init)
        ours_opt = torch.optim.SGD(lora.parameters(), lr=0.1, momentum=0.9)
        ref_params = [p for p in peft_model.parameters() if p.requires_grad]
        ref_opt = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9)
        losses = []
        for step in range(3):
            ids, mask = _batch(step)
            labels = ids.masked_fill(mask == 0, -100)
            labels[0, 3] = -100  # predicted from a padded position, whose output is meaningless (and differs)
            loss = model(ids, attention_mask=mask, labels=labels).loss
            ref_loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
            loss.backward()
            ref_loss.backward()
            if step == 0:  # every LoRA A/B gradient of every block, through the swarm
                ref_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
                assert len(ref_grads) == len(list(lora.parameters())) == 8 * 7 * 2
                for block, name in lora.keys:
                    key = f"base_model.model.model.layers.{block}.{name}"
                    a, b = lora.pair(block, name)
                    torch.testing.assert_close(
                        a.grad, ref_grads[f"{key}.lora_A.default.weight"], atol=1e-6, rtol=1e-4
                    )
                    torch.testing.assert_close(
                        b.grad, ref_grads[f"{key}.lora_B.default.weight"], atol=1e-6, rtol=1e-4
                    )
            ours_opt.step(), ref_opt.step(), ours_opt.zero_grad(), ref_opt.zero_grad()
            losses.append(loss.item())
        for block, name in lora.keys:  # the same parameters after the same steps
            key = f"base_model.model.model.layers.{block}.{name}"
            ref = dict(peft_model.named_parameters())
            torch.testing.assert_close(
                lora.pair(block, name)[0], ref[f"{key}.lora_A.default.weight"], atol=1e-5, rtol=0
            )
            torch.testing.assert_close(
                lora.pair(block, name)[1], ref[f"{key}.lora_B.default.weight"], atol=1e-5, rtol=0
            )

        saved = lora.save_pretrained(tmp_path / "trained")
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(copy.deepcopy(reference), saved).eval()
        loaded_params = dict(loaded.named_parameters())
        for block, name in lora.keys:  # the file holds exactly our trained weights ...
            key = f"base_model.model.model.layers.{block}.{name}"
            assert torch.equal(loaded_params[f"{key}.lora_A.default.weight"], lora.pair(block, name)[0])
            assert torch.equal(loaded_params[f"{key}.lora_B.default.weight"], lora.pair(block, name)[1])
        ids, mask = _batch(7)
        with torch.no_grad():  # ... and PEFT computes with them what the swarm computes
            torch.testing.assert_close(model(ids).logits, loaded(ids).logits, atol=1e-4, rtol=0)
        name = lora.current_name()
        lora.release()
        _assert_dropped(model.chain.chain, swarm, name)  # the manager under the LoraChain
    finally:
        model.shutdown()

    # the trained adapter, served by a new server with --adapters, generates like the merged PEFT model
    server = swarm.start_server("trained", tiny_llama, "--block_indices", "0:8", "--adapters", f"trained={saved}")
    try:
        merged = copy.deepcopy(loaded).merge_and_unload()
        client = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=swarm.initial_peers)
        try:
            prompt = _prompt(6, seed=8)
            kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
            assert torch.equal(
                client.generate(prompt, active_adapter="trained", **kwargs), merged.generate(prompt, **kwargs)
            )
        finally:
            client.shutdown()
    finally:
        server.terminate()
        server.wait(30)


def _assert_dropped(manager, swarm, name: str) -> None:
    """After release, no server knows the client's adapter any more."""
    hidden = torch.randn(1, 2, 64)
    positions, mask = torch.arange(2)[None], torch.ones(1, 2, dtype=torch.bool)
    for proc in (swarm.servers["with"], swarm.servers["without"]):
        request = ForwardRequest(manager.model, 0, 8, hidden, positions, mask, adapter=name)
        with pytest.raises(UnknownAdapterError):
            manager.bridge.run(manager.transport.call(proc.peer_id, request, ForwardResponse, 30))


def test_client_lora_generation_through_the_swarm(swarm, tiny_llama, peft_init):
    peft_model, init = peft_init
    merged = copy.deepcopy(peft_model).merge_and_unload()
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=swarm.initial_peers)
    try:
        lora = RemoteLora.attach(model, path=init)
        prompt = _prompt(6, seed=9)
        kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
        assert torch.equal(model.generate(prompt, **kwargs), merged.generate(prompt, **kwargs))
        lora.release()
    finally:
        model.shutdown()


def test_server_killed_mid_step_is_replaced_and_gradients_unchanged(swarm, tiny_llama, peft_init, monkeypatch):
    """Runs last: it kills the server that computed the forward, before the backward."""
    import os
    import signal

    import corolla.client.remote_autograd as remote_autograd
    from corolla.wire.messages import TrainForwardRequest

    used: list[str] = []
    real_call = remote_autograd.call_peer

    async def recording_call(manager, peer, request, expected):
        if isinstance(request, TrainForwardRequest):
            used.append(peer)
        return await real_call(manager, peer, request, expected)

    monkeypatch.setattr(remote_autograd, "call_peer", recording_call)  # the training path's one call site
    peft_model, init = peft_init
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=swarm.initial_peers)
    try:
        lora = RemoteLora.attach(model, path=init)
        # the inputs' gradient comes back too (here: to the embeddings, trained alongside)
        model.get_input_embeddings().weight.requires_grad_(True)
        peft_model.get_input_embeddings().weight.requires_grad_(True)
        ids, mask = _batch(3)
        loss = model(ids, labels=ids).loss
        # each chunk went to one of the two servers (each hosts every block); kill one that computed chunks
        victim = next(p for p in swarm.servers.values() if p.peer_id == used[0])
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(30)
        loss.backward()  # the span is retried on the other server, which gets the LoRA uploaded first
        ref_loss = peft_model(input_ids=ids, labels=ids).loss
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
        ref_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
        for block, name in lora.keys:
            key = f"base_model.model.model.layers.{block}.{name}"
            a, b = lora.pair(block, name)
            torch.testing.assert_close(a.grad, ref_grads[f"{key}.lora_A.default.weight"], atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(b.grad, ref_grads[f"{key}.lora_B.default.weight"], atol=1e-6, rtol=1e-4)
        expected = peft_model.get_input_embeddings().weight.grad
        torch.testing.assert_close(model.get_input_embeddings().weight.grad, expected, atol=1e-6, rtol=1e-4)
    finally:
        model.shutdown()
