"""Prompt tuning through a swarm, end to end, on one machine.

Starts a private swarm on 127.0.0.1 (a bootstrap peer and servers hosting the model's blocks), then trains
trainable prompts on the client while the blocks stay frozen on the servers:

- ``--task classification`` (default): a small sentiment task (sentences built from positive and negative
  word lists), with ``AutoDistributedModelForSequenceClassification``: the prompts and the score head train;
  prints the loss falling and the accuracy before and after.
- ``--task lm``: teaches a causal LM to answer every prompt with one fixed phrase, with
  ``AutoDistributedModelForCausalLM``; prints the loss falling, then generates with the trained prompts.
  (On the random demo model the LM loss falls slowly: prompts alone teach an untrained model little; use
  ``--model`` with a trained checkpoint, a higher ``--lr`` and more ``--steps``.)

Without ``--model`` it uses corolla's built-in demo checkpoint (a tiny random Llama with a tokenizer, built
locally, no download). Run::

    python examples/prompt_tuning.py                       # deep_ptune, classification
    python examples/prompt_tuning.py --task lm --tuning_mode ptune
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from corolla import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification
from corolla.cli.common import DefaultsHelpFormatter
from corolla.cli.local_swarm import LocalSwarm, threads_per_server
from corolla.models.checkpoint import Checkpoint, default_dht_prefix

POSITIVE = ["great", "wonderful", "lovely", "excellent", "delightful", "superb", "brilliant", "charming"]
NEGATIVE = ["awful", "terrible", "boring", "dreadful", "horrible", "dull", "painful", "disappointing"]
SUBJECTS = ["the film", "this book", "the dinner", "our trip", "the concert", "that game", "the show", "my day"]
TARGET = " Thank you for asking."


def say(*parts: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def sentiment_data(seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for subject in SUBJECTS:
        for label, words in ((1, POSITIVE), (0, NEGATIVE)):
            for word in rng.sample(words, 3):
                texts.append(f"{subject} was {word}")
                labels.append(label)
    order = list(range(len(texts)))
    rng.shuffle(order)
    return [texts[i] for i in order], [labels[i] for i in order]


def train_classifier(args, model_path: str, peers: list[str], tokenizer) -> None:
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        model_path, initial_peers=peers, num_labels=2, tuning_mode=args.tuning_mode, pre_seq_len=args.pre_seq_len
    )
    try:
        texts, labels = sentiment_data(args.seed)
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = torch.tensor(labels)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)

        def accuracy() -> float:
            with torch.no_grad():
                logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return (logits.argmax(-1) == labels).float().mean().item()

        say(f"accuracy before training: {accuracy():.2f} on {len(texts)} sentences")
        for step in range(1, args.steps + 1):
            optimizer.zero_grad()
            loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
            loss.backward()  # gradients come back through the servers
            optimizer.step()
            if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
                say(f"step {step:3d}  loss {loss.item():.4f}")
        say(f"accuracy after training: {accuracy():.2f}")
    finally:
        model.shutdown()


def train_lm(args, model_path: str, peers: list[str], tokenizer) -> None:
    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_path, initial_peers=peers, tuning_mode=args.tuning_mode, pre_seq_len=args.pre_seq_len
    )
    try:
        prompts = [f"How was {subject}?" for subject in SUBJECTS]
        texts = [p + TARGET + tokenizer.eos_token for p in prompts]
        tokenizer.padding_side = "right"
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        for row, question in enumerate(prompts):  # learn the answer only, not the questions
            labels[row, : len(tokenizer(question)["input_ids"])] = -100
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        for step in range(1, args.steps + 1):
            optimizer.zero_grad()
            loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
            loss.backward()
            optimizer.step()
            if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
                say(f"step {step:3d}  loss {loss.item():.4f}")
        model.eval()
        question = tokenizer("How was the weather?", return_tensors="pt")["input_ids"]
        out = model.generate(question, max_new_tokens=8, do_sample=False)
        say("generated with the trained prompts:", repr(tokenizer.decode(out[0], skip_special_tokens=True)))
    finally:
        model.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: corolla's built-in demo model)")
    parser.add_argument(
        "--task",
        choices=("classification", "lm"),
        default="classification",
        help="sentiment classification, or language modelling of a few sentences",
    )
    parser.add_argument(
        "--tuning_mode",
        choices=("ptune", "deep_ptune"),
        default="deep_ptune",
        help="prompts at the input only, or before every block",
    )
    parser.add_argument("--pre_seq_len", type=int, default=4, help="number of trainable prompt tokens")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=0.02, help="learning rate")
    parser.add_argument("--num_servers", type=int, default=2, help="servers of the local swarm")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--startup_timeout", type=float, default=300, help="seconds to wait for the servers")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    if args.model is None:
        from corolla.cli.demo_checkpoint import ensure_demo_checkpoint

        say("building / reusing the demo checkpoint (a tiny random Llama; the task is learnt by the prompts)")
        args.model = str(ensure_demo_checkpoint())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    num_blocks = Checkpoint(args.model).config.num_hidden_layers
    logs = tempfile.mkdtemp(prefix="corolla-ptune-")  # kept: the path printed stays valid
    with LocalSwarm(Path(logs)) as swarm:
        say(f"starting a local swarm: {args.num_servers} servers over {num_blocks} blocks (logs in {logs})")
        peers = swarm.start_dht()
        os.environ["COROLLA_SWARM_KEY"] = swarm.swarm_key  # the swarm is private: our clients join with its key
        swarm.start_servers(
            args.model, args.num_servers, num_blocks, num_threads=threads_per_server(args.num_servers)
        )
        swarm.wait_ready(default_dht_prefix(args.model), num_blocks, args.startup_timeout, progress=say)
        say(f"swarm ready; training {args.tuning_mode} with {args.pre_seq_len} prompt tokens, {args.steps} steps")
        if args.task == "classification":
            train_classifier(args, args.model, peers, tokenizer)
        else:
            train_lm(args, args.model, peers, tokenizer)
    say(f"kept: the servers' logs in {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
