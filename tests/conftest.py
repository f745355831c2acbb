"""Fixtures shared by every test layer: tiny checkpoints written by transformers, and process cleanup.

Every subprocess a test starts goes through :class:`ProcessGroups`: it runs in its own session
(``start_new_session=True``), so teardown can SIGCONT (in case a test SIGSTOPped it), SIGTERM and
finally SIGKILL its whole process group, p2pd and the reaper included, even when the test failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import write_llama

# Two cores run every process of a test swarm: one torch thread each keeps them from fighting.
torch.set_num_threads(1)
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="session", autouse=True)
def corolla_cache_dir(tmp_path_factory):
    """Servers started by tests cache their throughput measurement here, not in the user's ~/.cache."""
    path = tmp_path_factory.mktemp("corolla-cache")
    previous = os.environ.get("COROLLA_CACHE_DIR")
    os.environ["COROLLA_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("COROLLA_CACHE_DIR", None)
    else:
        os.environ["COROLLA_CACHE_DIR"] = previous


@pytest.fixture(scope="session", autouse=True)
def swarm_key(tmp_path_factory):
    """Every swarm the tests start is private: peers, servers and clients find the key in $COROLLA_SWARM_KEY
    (tests of open swarms and of outsiders pass ``--swarm_key ""`` / ``swarm_key=""``)."""
    from corolla.swarm.trust import SWARM_KEY_ENV, SwarmKey

    path = tmp_path_factory.mktemp("swarm-key") / "swarm.key"
    SwarmKey.generate(path)
    previous = os.environ.get(SWARM_KEY_ENV)
    os.environ[SWARM_KEY_ENV] = str(path)
    yield path
    if previous is None:
        os.environ.pop(SWARM_KEY_ENV, None)
    else:
        os.environ[SWARM_KEY_ENV] = previous


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_llama(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


class ProcessGroups:
    """Starts subprocesses each in its own process group and reaps every group at teardown."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], name: str, **kwargs) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed when the process is reaped
        env = {**os.environ, **CHILD_ENV, **kwargs.pop("env", {})}
        proc = subprocess.Popen(
            [sys.executable, *args], stdout=kwargs.pop("stdout", log), stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env, text=True, **kwargs,
        )  # fmt: skip
        proc.log_path = self.log_dir / f"{name}.log"
        proc.log_file = log
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        # SIGTERM the main process only (a server then announces offline through its still-running p2pd),
        # then SIGKILL whatever is left of each group.
        for proc in self.procs:
            _signal_group(proc, signal.SIGCONT)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # whatever is left of the group: p2pd, the reaper
            proc.wait()
            proc.log_file.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def processes(tmp_path):
    groups = ProcessGroups(tmp_path)
    yield groups
    groups.kill_all()


@pytest.fixture(scope="session")
def session_processes(tmp_path_factory):
    groups = ProcessGroups(tmp_path_factory.mktemp("logs"))
    yield groups
    groups.kill_all()
