"""LoRA training through a swarm, end to end, on one machine; then serving the trained adapter.

Starts a private swarm on 127.0.0.1 (a bootstrap peer and servers hosting the model's blocks), then trains
LoRA weights for every block on the client (``RemoteLora``): the servers compute each block with the
client's LoRA slices (uploaded once per optimizer step) and send back their gradients; the client's
optimizer updates them. The task teaches the model to answer every question with one fixed phrase; the
script prints the loss falling and what the model generates before and after.

The trained adapter is saved in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained`` loads). With ``--serve`` the script then restarts the swarm with
``corolla server ... --adapters trained=FOLDER`` and generates with ``active_adapter="trained"``: the same
text, now computed by servers that serve the adapter to any client.

Without ``--model`` it uses corolla's built-in demo checkpoint (a tiny random Llama with a tokenizer, built
locally, no download). Run::

    python examples/lora_training.py
    python examples/lora_training.py --serve --out ./my-adapter
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.cli.common import DefaultsHelpFormatter
from corolla.cli.local_swarm import LocalSwarm, threads_per_server
from corolla.client.lora import RemoteLora
from corolla.models.checkpoint import Checkpoint, default_dht_prefix

SUBJECTS = ["the film", "this book", "the dinner", "our trip", "the concert", "that game", "the show", "my day"]
TARGET = " It was great, thank you."
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def say(*parts: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def training_batch(tokenizer) -> dict:
    questions = [f"How was {subject}?" for subject in SUBJECTS]
    tokenizer.padding_side = "right"
    batch = tokenizer([q + TARGET + tokenizer.eos_token for q in questions], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for row, question in enumerate(questions):  # learn the answer only, not the questions
        labels[row, : len(tokenizer(question)["input_ids"])] = -100
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def answer(model, tokenizer, question: str, **kwargs) -> str:
    ids = tokenizer(question, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def start_swarm(swarm: LocalSwarm, args, num_blocks: int, extra_args: list[str] = ()) -> list[str]:
    peers = swarm.start_dht()
    os.environ["COROLLA_SWARM_KEY"] = swarm.swarm_key  # the swarm is private: our clients join with its key
    swarm.start_servers(
        args.model, args.num_servers, num_blocks, list(extra_args), threads_per_server(args.num_servers)
    )
    swarm.wait_ready(default_dht_prefix(args.model), num_blocks, args.startup_timeout, progress=say)
    return peers


def train(args, peers: list[str], tokenizer, out: Path) -> str:
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=peers)
    try:
        lora = RemoteLora.attach(model, r=args.r, lora_alpha=args.alpha, target_modules=args.targets)
        count = sum(p.numel() for p in lora.parameters())
        say(f"LoRA r={args.r} alpha={args.alpha} on {', '.join(args.targets)}: {count} trainable parameters")
        question = "How was the weather?"
        say("before training, the model answers:", repr(answer(model, tokenizer, question)))
        batch = training_batch(tokenizer)
        optimizer = torch.optim.Adam(lora.parameters(), lr=args.lr)
        for step in range(1, args.steps + 1):
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()  # gradients of every block's LoRA come back from the servers
            optimizer.step()
            if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
                say(f"step {step:3d}  loss {loss.item():.4f}")
        trained = answer(model, tokenizer, question)
        say("after training, the model answers:", repr(trained))
        lora.save_pretrained(out, base_model=args.model)
        say(f"saved the adapter in PEFT format to {out}")
        lora.release()  # servers drop our uploads now (they would after their TTL anyway)
        return trained
    finally:
        model.shutdown()


def serve(args, num_blocks: int, tokenizer, out: Path, expected: str) -> None:
    logs = tempfile.mkdtemp(prefix="corolla-lora-serve-")  # kept: the paths printed stay valid
    with LocalSwarm(Path(logs)) as swarm:
        say(f"restarting the swarm with --adapters trained={out}")
        peers = start_swarm(swarm, args, num_blocks, ["--adapters", f"trained={out}"])
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=peers)
        try:
            served = answer(model, tokenizer, "How was the weather?", active_adapter="trained")
            base = answer(model, tokenizer, "How was the weather?")
            say("served adapter answers:", repr(served), "| same as the trained client:", served == expected)
            say("base model (no adapter) answers:", repr(base))
        finally:
            model.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: corolla's built-in demo model)")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha (scale = alpha / r)")
    parser.add_argument("--targets", nargs="+", default=TARGETS, help="target modules (HF names)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    parser.add_argument("--num_servers", type=int, default=2, help="servers of the local swarm")
    parser.add_argument("--out", type=Path, default=None, help="where to save the adapter (default: a temp dir)")
    parser.add_argument("--serve", action="store_true", help="then serve the adapter with --adapters and generate")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--startup_timeout", type=float, default=300, help="seconds to wait for the servers")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    if args.model is None:
        from corolla.cli.demo_checkpoint import ensure_demo_checkpoint

        say("building / reusing the demo checkpoint (a tiny random Llama with a tokenizer)")
        args.model = str(ensure_demo_checkpoint())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    num_blocks = Checkpoint(args.model).config.num_hidden_layers
    # the adapter and the logs are kept (their paths are printed; delete them when done)
    out = args.out or Path(tempfile.mkdtemp(prefix="corolla-lora-")) / "adapter"
    logs = tempfile.mkdtemp(prefix="corolla-lora-logs-")
    with LocalSwarm(Path(logs)) as swarm:
        say(f"starting a local swarm: {args.num_servers} servers over {num_blocks} blocks (logs in {logs})")
        peers = start_swarm(swarm, args, num_blocks)
        say(f"swarm ready; training LoRA for {args.steps} steps")
        trained = train(args, peers, tokenizer, out)
    if args.serve:
        serve(args, num_blocks, tokenizer, out, trained)
    say(f"kept: the adapter in {out}, the servers' logs in {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
