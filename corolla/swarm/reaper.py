"""Make helper processes die with the process that started them, however it dies.

hivemind starts a ``p2pd`` daemon per peer. If the Python process is SIGKILLed, the daemon keeps
running: the dead server would stay reachable. ``prctl(PR_SET_PDEATHSIG)`` cannot be set on a child
that a library spawns, so instead each process that starts helpers also starts one tiny reaper (this
module run as a script, stdlib only): it reads ``"<pid> <create_time>"`` lines from a pipe whose only
writer is the parent. When the parent dies by any means the kernel closes the pipe, the reaper sees
EOF and SIGKILLs every helper it was told about that is still the same process (the create time
guards against a recycled pid). On a clean shutdown the parent closes the pipe itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import psutil

_lock = threading.Lock()
_reaper: subprocess.Popen | None = None


def watch(pid: int) -> None:
    """Kill process ``pid`` when this process dies (SIGKILL included)."""
    global _reaper
    create_time = psutil.Process(pid).create_time()
    with _lock:
        if _reaper is None or _reaper.poll() is not None:
            _reaper = subprocess.Popen(
                [sys.executable, __file__],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                close_fds=True,
            )
        assert _reaper.stdin is not None
        _reaper.stdin.write(f"{pid} {create_time!r}\n".encode())
        _reaper.stdin.flush()


def children_named(name: str) -> list[int]:
    """Pids of this process's live children (recursively) whose executable name is ``name``."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() == name:
                out.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _main() -> None:
    # Ignore the terminal's Ctrl-C: the parent decides when we are done, by closing the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watched: list[tuple[int, str]] = []
    for line in sys.stdin.buffer:
        pid, create_time = line.split()
        watched.append((int(pid), create_time.decode()))
    for pid, create_time in watched:
        _kill_if_same(pid, create_time)


def _kill_if_same(pid: int, create_time: str) -> None:
    try:
        if repr(psutil.Process(pid).create_time()) == create_time:
            os.kill(pid, signal.SIGKILL)
    except (psutil.Error, ProcessLookupError, PermissionError):
        pass  # already gone


if __name__ == "__main__":
    _main()
