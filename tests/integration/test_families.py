"""Every family besides Llama generates through a real 2-server swarm, token-exact with transformers.

One module-scoped DHT; per family (a parametrized module-scoped fixture, so only one family's servers run
at a time) a tiny random checkpoint saved by transformers (sharded safetensors + index) and two servers
hosting blocks [0, 2) and [2, 4). The client is `AutoDistributedModelForCausalLM` (which must pick the
family's class); the reference is the transformers class on the same checkpoint.
"""

from __future__ import annotations

import pytest
import torch
from swarm_harness import Swarm
from tiny_models import CONFIGS, make_checkpoint

from corolla import AutoDistributedModelForCausalLM
from corolla.client.model import MODEL_CLASSES
from corolla.wire.records import ServerState

FAMILIES = {  # swarm model name -> tiny config (see tiny_models.CONFIGS); llama: test_generate.py
    "tiny-mistral": "mistral-sliding",
    "tiny-qwen2": "qwen2-sliding",
    "tiny-qwen3": "qwen3-sliding-bias",
    "tiny-mixtral": "mixtral-top2-sliding",
    "tiny-bloom": "bloom",
    "tiny-falcon": "falcon-new-gqa",
}


@pytest.fixture(scope="module")
def dht(session_processes, tmp_path_factory):
    groups = type(session_processes)(tmp_path_factory.mktemp("families-logs"))
    swarm = Swarm(groups, tmp_path_factory.mktemp("families"))
    swarm.start_dht()
    yield swarm
    swarm.close()
    groups.kill_all()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, dht, tmp_path_factory):
    """(checkpoint folder, transformers model, client model) with this family's two servers running."""
    name = request.param
    folder = tmp_path_factory.mktemp("family-ckpt") / name
    reference = make_checkpoint(CONFIGS[FAMILIES[name]](), folder, seed=7)
    layers = reference.config.num_hidden_layers
    procs = [
        dht.start_server(f"{name}-{i}", folder, "--block_indices", blocks, "--throughput", "100", wait=False)
        for i, blocks in enumerate(("0:2", f"2:{layers}"))
    ]
    for proc in procs:
        dht.wait_state(proc, ServerState.ONLINE, name, num_blocks=layers)
    model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=dht.initial_peers)
    yield folder, reference, model
    model.shutdown()
    for proc in procs:  # stop this family's servers before the next family starts
        proc.terminate()
        proc.wait(timeout=60)


def test_client_class_and_logits(family):
    _, reference, model = family
    assert type(model) is MODEL_CLASSES[reference.config.model_type]
    ids = torch.randint(3, reference.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)


def test_greedy_left_padded_batch_is_token_exact(family):
    _, reference, model = family
    ids = torch.randint(3, reference.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(ids, **options), reference.generate(ids, **options))
