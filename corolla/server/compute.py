"""The one compute worker: a thread that runs every block computation of this server, by priority.

All torch work happens on this thread, so concurrent sessions never race on a device and the event
loop stays free to answer pings and read the next messages while a step computes (torch releases
the GIL inside its kernels). Inference steps go before forward passes (lower number = sooner); equal
priorities run in arrival order. Each job is a plain callable; its result or exception comes back to
the submitting coroutine through its future. A job runs in a copy of the submitter's context
(``contextvars``), so per-request choices set around ``submit`` (the LoRA adapter, see
``corolla.models.lora.use_adapter``) apply to that job only.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

PRIORITY_INFERENCE = 0
PRIORITY_FORWARD = 10


class ComputeWorker:
    def __init__(self, name: str = "corolla-compute"):
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def submit(self, priority: int, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        context = contextvars.copy_context()
        self._jobs.put((priority, next(self._seq), context.run, (fn, *args), loop, future))
        return await future

    def shutdown(self) -> None:
        self._jobs.put((float("inf"), next(self._seq), None, (), None, None))
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            _, _, fn, args, loop, future = self._jobs.get()
            if fn is None:
                return
            if future.cancelled():
                continue
            try:
                with torch.inference_mode():
                    result = fn(*args)
            except BaseException as e:  # delivered to the caller, who decides
                loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
