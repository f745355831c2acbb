"""Quantized servers on a real swarm: announcement, generation, and clients that require full precision.

Two servers of a tiny Llama with non-pathological weights (`tiny_models.tame_init`): blocks [0, 2) with
`--quant_type int8` and [2, 4) with `--quant_type nf4`. Greedy generation through them is token-exact with
the same blocks quantized locally (the quantization is deterministic), and the logits stay close to
full precision (bounds as in tests/models/test_quantization.py for the weaker of the two, nf4).
"""

from __future__ import annotations

import types

import pytest
import torch
from swarm_harness import Swarm
from tiny_models import write_tame
from transformers import LlamaConfig

from corolla import AutoDistributedModelForCausalLM, MissingBlocksError
from corolla.client.local_chain import LocalChain
from corolla.models import BlockStack
from corolla.models.quant import quantize_layers
from corolla.wire.records import ServerState

NAME, LAYERS, VOCAB = "tiny-quant", 4, 128
SPANS = {"int8": (0, 2), "nf4": (2, 4)}


@pytest.fixture(scope="module")
def quant_swarm(session_processes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant-ckpt") / NAME
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0,
    )  # fmt: skip
    reference = write_tame(config, folder)
    groups = type(session_processes)(tmp_path_factory.mktemp("quant-logs"))
    swarm = Swarm(groups, tmp_path_factory.mktemp("quant"))
    swarm.start_dht()
    procs = {
        quant: swarm.start_server(
            f"quant-{quant}",
            folder,
            "--block_indices",
            f"{start}:{end}",
            "--quant_type",
            quant,
            "--throughput",
            "100",
            wait=False,
        )  # fmt: skip
        for quant, (start, end) in SPANS.items()
    }
    for proc in procs.values():
        swarm.wait_state(proc, ServerState.ONLINE, NAME, num_blocks=LAYERS)
    yield types.SimpleNamespace(folder=folder, reference=reference, swarm=swarm, procs=procs)
    swarm.close()
    groups.kill_all()


def _prompt() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    return ids, mask


def test_servers_announce_their_quantization(quant_swarm):
    for quant, proc in quant_swarm.procs.items():
        info = quant_swarm.swarm.wait_state(proc, ServerState.ONLINE, NAME, num_blocks=LAYERS)
        assert info.quantization == quant


@torch.no_grad()
def test_generation_through_quantized_servers(quant_swarm):
    local = BlockStack.load(str(quant_swarm.folder), 0, LAYERS, dtype=torch.float32, progress=False)
    for quant, (start, end) in SPANS.items():
        quantize_layers(local.layers[start:end], quant)
    expected_model = AutoDistributedModelForCausalLM.from_pretrained(quant_swarm.folder, chain=LocalChain(local))
    model = AutoDistributedModelForCausalLM.from_pretrained(
        quant_swarm.folder, initial_peers=quant_swarm.swarm.initial_peers
    )
    try:
        ids, mask = _prompt()
        options = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(model.generate(ids, **options), expected_model.generate(ids, **options))
        logits = model(ids[1:]).logits
    finally:
        model.shutdown()
    full = quant_swarm.reference(ids[1:]).logits
    agreement = (logits.argmax(-1) == full.argmax(-1)).float().mean().item()
    assert agreement >= 0.75 and not torch.allclose(logits, full, atol=1e-5)


def test_client_requiring_full_precision_refuses_quantized_servers(quant_swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        quant_swarm.folder,
        initial_peers=quant_swarm.swarm.initial_peers,
        require_full_precision=True,
        missing_blocks_timeout=2.0,
    )
    try:
        with pytest.raises(MissingBlocksError, match="quantized weights and require_full_precision"):
            model.generate(_prompt()[0], max_new_tokens=2)
    finally:
        model.shutdown()
