"""The environment of Petals' own client tests (converted: see README.md): a real corolla swarm of a tiny Llama.

Petals' tests read MODEL_NAME, REF_NAME and INITIAL_PEERS when `test_utils.py` is imported, that is at
collection, before any fixture runs. So this module fixes them when it is imported: a checkpoint folder
(written by transformers, with a tokenizer) and the address of a bootstrap peer whose identity and
loopback port are chosen now; the session fixture writes the checkpoint and starts the swarm there (a
bootstrap peer and two servers, blocks 0:4 and 4:8) before the first of these tests runs.

Petals runs each test in a forked process (`@pytest.mark.forked`, from pytest-forked, which needs pytest < 9):
what a test leaves behind dies with its process. Here tests run in the pytest process, so `_like_forked`
does that cleanup: it shuts down the swarm clients and hivemind DHTs a test created and did not shut down.

Tests left out (`LEFT_OUT`) stay in their files unchanged and are skipped with the reason.
"""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest
from hivemind.p2p import P2P, PeerID

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # Petals' tests import `test_utils` (and here `petals_reference`) top-level

#: test node id (relative to this folder) -> why it is left out
LEFT_OUT = {
    "test_remote_sequential.py::test_remote_sequential": (
        "its second half subclasses RemoteSequenceManager to override Petals' hivemind RPC internals "
        "(rpc_info's forward_schema, get_request_metadata's output_compression) and expects the servers to "
        "compress their replies; corolla has no hivemind RPC schema, and forward replies travel as computed"
    ),
}

_WORKDIR = Path(tempfile.mkdtemp(prefix="corolla-petals-compat-"))
atexit.register(shutil.rmtree, _WORKDIR, True)
MODEL_PATH = _WORKDIR / "tiny-llama"  # "llama" in the name: Petals skips its speculative test otherwise
BOOTSTRAP_IDENTITY = _WORKDIR / "bootstrap.id"


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


P2P.generate_identity(str(BOOTSTRAP_IDENTITY))
BOOTSTRAP_MADDR = f"/ip4/127.0.0.1/tcp/{_free_loopback_port()}"
INITIAL_PEER = f"{BOOTSTRAP_MADDR}/p2p/{PeerID.from_identity(BOOTSTRAP_IDENTITY.read_bytes()).to_base58()}"
os.environ.update(MODEL_NAME=str(MODEL_PATH), REF_NAME=str(MODEL_PATH), INITIAL_PEERS=INITIAL_PEER)
os.environ.pop("ADAPTER_NAME", None)  # no served adapter in this swarm (the PEFT variant is not run)


def pytest_configure(config):
    config.addinivalue_line("markers", "forked: Petals runs the test in a forked process (emulated here)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.path)).resolve()
        if path.parent == HERE:
            reason = LEFT_OUT.get(f"{path.name}::{item.name.split('[')[0]}")
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=f"left out of the Petals conversion: {reason}"))


def write_tiny_llama(path: Path) -> None:
    """A tiny random Llama (8 blocks, hidden 64) and a byte-level BPE tokenizer, saved by transformers."""
    from tiny_models import write_llama
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: the model's pad 0, bos 1, eos 2
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, min_frequency=1, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    core.train_from_iterator(["A quick brown fox was minding its own business. A cat sat on a mat."], trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left",
    )  # fmt: skip
    tokenizer.save_pretrained(path)
    write_llama(path)  # vocab 320 >= the tokenizer's 300


@pytest.fixture(scope="session", autouse=True)
def petals_swarm(session_processes):
    """The swarm at INITIAL_PEERS serving MODEL_NAME, for every test of this folder."""
    sys.path.insert(0, str(HERE.parent / "integration"))
    from swarm_harness import Swarm

    from corolla.wire.records import ServerState

    write_tiny_llama(MODEL_PATH)
    swarm = Swarm(session_processes, _WORKDIR)
    proc = session_processes.start(
        ["-m", "corolla.cli.run_dht", "--host_maddrs", BOOTSTRAP_MADDR, "--identity_path", str(BOOTSTRAP_IDENTITY)],
        "petals-dht", stdout=-1,
    )  # fmt: skip
    printed = proc.stdout.readline().strip()
    assert printed == INITIAL_PEER, f"bootstrap peer printed {printed!r}, expected {INITIAL_PEER!r}"
    swarm.initial_peers = [INITIAL_PEER]
    servers = [swarm.start_server(name, MODEL_PATH, "--block_indices", blocks, wait=False)
               for name, blocks in (("petals-s0", "0:4"), ("petals-s1", "4:8"))]  # fmt: skip
    for server in servers:
        swarm.wait_state(server, ServerState.ONLINE, "tiny-llama")
    yield swarm
    swarm.close()


@pytest.fixture(autouse=True)
def _like_forked():
    """Shut down the swarm clients and hivemind DHTs a test leaves running (its forked process would end)."""
    from hivemind import DHT

    from corolla.client.sequence_manager import RemoteSequenceManager

    kinds = (RemoteSequenceManager, DHT)
    before = {id(obj) for obj in gc.get_objects() if issubclass(type(obj), kinds)}
    yield
    gc.collect()
    for obj in gc.get_objects():
        if issubclass(type(obj), kinds) and id(obj) not in before:
            if isinstance(obj, DHT):
                if obj.is_alive():
                    obj.shutdown()
            else:
                obj.shutdown()
