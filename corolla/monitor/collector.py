"""Reads the models' records from the DHT on a thread and keeps the latest :func:`swarm_json` picture.

The thin shell around :mod:`corolla.monitor.state`: one :class:`~corolla.swarm.reader.SwarmReader`
(a client-mode peer: it stores nothing and calls no server), one read of every model per period, and a
log line for each change worth an operator's attention (a server appearing, changing state, moving or
expiring; a gap opening or closing). A failed read keeps the last good picture and says why in
``error``, so the page can show stale data as stale instead of going blank.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from corolla import __version__
from corolla.monitor.state import ModelState, announced_block_count, describe_changes, model_state, swarm_json
from corolla.swarm.reader import SwarmReader

logger = logging.getLogger("corolla.monitor")

ModelRef = tuple[str, int | None]  # (dht_prefix, num_blocks); None: infer the count from the records
PROBE_BLOCKS = 128  # blocks read at once when the count is not known; more only if a record says so
MAX_BLOCKS = 4096  # a bound on what a (possibly bogus) announced end can make us read


def read_models(reader: SwarmReader, models: Sequence[ModelRef] | None) -> list[ModelState]:
    """One DHT read per model, in the order given; ``models`` None: every model in the swarm's directory."""
    if models is None:
        models = [(record.dht_prefix, record.num_blocks) for record in reader.models()]
    return [read_model(reader, prefix, num_blocks) for prefix, num_blocks in models]


def read_model(reader: SwarmReader, dht_prefix: str, num_blocks: int | None) -> ModelState:
    """Read one model; without ``num_blocks``, probe the first blocks and trust the largest announced end."""
    if num_blocks is not None:
        records, inferred = reader.block_infos(dht_prefix, num_blocks), False
    else:
        records = reader.block_infos(dht_prefix, PROBE_BLOCKS)
        count = min(announced_block_count(records), MAX_BLOCKS)
        if count > len(records):
            records = reader.block_infos(dht_prefix, count)
        records, inferred = records[:count], True
    peers = sorted({peer for servers in records for peer in servers})
    return model_state(dht_prefix, records, inferred, reader.tamper_reports(dht_prefix, peers))


class StateCollector:
    """Refreshes the state every ``period`` seconds on a daemon thread; :meth:`latest` is thread-safe."""

    def __init__(self, reader: SwarmReader, models: Sequence[ModelRef] | None, period: float):
        if period <= 0:
            raise ValueError(f"refresh period must be positive, got {period}")
        self.reader, self.period = reader, period
        self.models = list(models) if models is not None else None
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._states: list[ModelState] | None = None
        self._updated_at: float | None = None
        self._error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="corolla-monitor-collector", daemon=True)

    def start(self) -> StateCollector:
        self._thread.start()
        return self

    def refresh(self) -> None:
        """Read every model once; log what changed since the last read."""
        try:
            states = read_models(self.reader, self.models)
        except Exception as e:  # the DHT read timed out or the peer lost the swarm: keep the last picture
            message = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if message != self._error:
                logger.warning("Reading the DHT failed (%s); showing the last state read", message)
            with self._lock:
                self._error = message
            return
        previous = self._states or [None] * len(states)
        for old, new in zip(previous, states):
            for line in describe_changes(old, new):
                logger.info("%s", line)
        if self._error is not None:
            logger.info("Reading the DHT works again")
        with self._lock:
            self._states, self._updated_at, self._error = states, time.time(), None

    def latest(self) -> dict[str, Any]:
        """The last picture as JSON: models (empty before the first read), timestamps, the last error."""
        with self._lock:
            states, updated_at, error = self._states, self._updated_at, self._error
        return swarm_json(
            states or [],
            software_version=__version__,
            started_at=self.started_at,
            updated_at=updated_at,
            served_at=time.time(),
            refresh_seconds=self.period,
            error=error,
            swarm=self.reader.trust_json(),
        )

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.refresh()
            self._stop.wait(max(0.0, self.period - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.reader.timeout + 5)
