"""Where corolla keeps files between runs: one cache folder, named by one environment variable.

``$COROLLA_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/corolla``, else ``~/.cache/corolla``. It holds the
built-in demo model (``demo-llama/``) and servers' throughput measurements (``throughput.json``).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "COROLLA_CACHE_DIR"


def cache_dir() -> Path:
    if override := os.environ.get(CACHE_ENV):
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "corolla"
