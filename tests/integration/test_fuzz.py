"""The live fuzzer of bench/fuzz.py at a small count, against a server of the shared swarm over real p2pd streams,
while a normal client generates: the server stays up and answers, no frame crashes a handler (no ``internal``
error) or goes unanswered, and every generation during the fuzz is token-identical to the one before it."""

from __future__ import annotations

import threading

import torch

from bench.fuzz import fuzz
from corolla import AutoDistributedModelForCausalLM
from corolla.wire.messages import PingRequest, PingResponse

FRAMES = 600


def test_fuzzed_server_stays_up_and_exact(shared_swarm, tiny_llama, manager):
    peer = shared_swarm.servers["s0"].peer_id
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=shared_swarm.initial_peers)
    prompt = torch.randint(3, 320, (1, 10), generator=torch.Generator().manual_seed(7))

    def generate() -> list[int]:
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=6, do_sample=False)[0].tolist()

    stop, generations, errors = threading.Event(), [], []

    def normal_client() -> None:
        while not stop.is_set():
            try:
                generations.append(generate())
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                errors.append(repr(e))

    try:
        baseline = generate()
        thread = threading.Thread(target=normal_client, name="normal-client", daemon=True)
        thread.start()
        try:
            report = manager.bridge.run(fuzz(manager.transport, peer, manager.model, 64, FRAMES, seed=15))
        finally:
            stop.set()
            thread.join(120)
    finally:
        model.shutdown()

    assert report["frames"] >= FRAMES
    assert report["internal_error_count"] == 0, report["internal_errors"]
    assert report["hangs"] == 0, report["hang_examples"]
    assert not errors, errors
    assert generations and all(tokens == baseline for tokens in generations)
    assert shared_swarm.servers["s0"].poll() is None
    assert isinstance(
        manager.bridge.run(manager.transport.call(peer, PingRequest(), PingResponse, 10)), PingResponse
    )
    assert "Traceback" not in shared_swarm.servers["s0"].log_path.read_text()
