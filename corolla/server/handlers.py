"""RPC handlers: read a call's first frame, check it, serve it, answer errors as ``ErrorResponse``.

A failure in one call never reaches another: every handler catches what its call raised, answers
with the error's code and message (unexpected exceptions become ``internal`` and are logged), and
closes only its own stream. Framing errors leave the stream out of sync, so they end the call; a
well-framed but invalid inference step is answered with an error and the session stays usable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from corolla.models.lora import use_adapter
from corolla.server.adapters import AdapterStore, lora_backward, lora_forward
from corolla.server.backend import BlockBackend
from corolla.server.backward import TrainingBackend
from corolla.server.memory_cache import MemoryCache
from corolla.wire.errors import (
    BadRequestError,
    RemoteError,
    ServerBusyError,
    ServerRefusedError,
    SessionLengthError,
    UnknownAdapterError,
)
from corolla.wire.framing import read_message, write_message
from corolla.wire.messages import (
    BackwardRequest,
    ErrorResponse,
    ForwardRequest,
    ForwardResponse,
    InferenceOpen,
    InferenceOpened,
    InferencePromptStep,
    InferenceStep,
    InferenceStepResult,
    InfoRequest,
    InfoResponse,
    LoraReleaseRequest,
    LoraReleaseResponse,
    LoraUploadRequest,
    LoraUploadResponse,
    ModelRef,
    PingRequest,
    PingResponse,
    ProbeRequest,
    ProbeResponse,
    TrainForwardRequest,
)
from corolla.wire.records import ServerInfo
from corolla.wire.tensors import dtype_name

logger = logging.getLogger(__name__)


class RequestHandler:
    """Serves every call on this server's stream protocol."""

    def __init__(
        self,
        backend: BlockBackend,
        memory: MemoryCache,
        model: ModelRef,
        get_info: Callable[[], ServerInfo],
        *,
        inference_max_length: int,
        max_batch_size: int,
        request_timeout: float,
        session_timeout: float,
        max_message_bytes: int,
        adapters: AdapterStore | None = None,
    ):
        self.backend, self.memory, self.model, self.get_info = backend, memory, model, get_info
        self.adapters = adapters
        self.inference_max_length = inference_max_length
        self.max_batch_size = max_batch_size
        self.request_timeout = request_timeout
        self.session_timeout = session_timeout
        self.max_bytes = max_message_bytes
        self.training = TrainingBackend(backend, max_batch_size=max_batch_size, max_length=inference_max_length)
        self.accepting = True
        self.active_sessions = 0
        self._tasks: set[asyncio.Task] = set()

    async def __call__(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        peer = str(stream_info.peer_id)
        try:
            await self._serve(peer, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away; its session (if any) is already released
        except Exception as e:
            await self._answer_error(writer, e, peer)
        finally:
            self._tasks.discard(task)
            if not writer.is_closing():
                writer.close()

    async def _serve(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await asyncio.wait_for(read_message(reader, self.max_bytes), self.request_timeout)
        if isinstance(request, PingRequest):
            await self._send(writer, PingResponse(time.time()))
        elif isinstance(request, InfoRequest):
            await self._send(writer, InfoResponse(self.get_info()))
        elif isinstance(request, ProbeRequest):  # another server measuring its bandwidth to us
            await self._send(writer, ProbeResponse(len(request.payload)))
        elif isinstance(request, ForwardRequest):
            self._check_model(request.model)
            self._check_accepting()
            with self._use_adapter(peer, request.adapter, request.start, request.end):
                out = await asyncio.wait_for(
                    self.backend.forward(
                        request.start, request.end, request.hidden, request.positions, request.attention_mask
                    ),
                    self.request_timeout,
                )
            await self._send(writer, ForwardResponse(out))
        elif isinstance(request, (TrainForwardRequest, BackwardRequest)):
            self._check_model(request.model)
            self._check_accepting()
            serve = self.training.forward if isinstance(request, TrainForwardRequest) else self.training.backward
            own = self._client_adapter(peer, request)
            if own is not None and isinstance(
                request, BackwardRequest
            ):  # the client's LoRA: its grads go back too
                response = await asyncio.wait_for(
                    lora_backward(self.training, own, request, peer), self.request_timeout
                )
            elif own is not None and request.graph_id:  # keep the forward's graph over the client's LoRA
                response = await asyncio.wait_for(
                    lora_forward(self.training, own, request, peer), self.request_timeout
                )
            else:
                with self._use_adapter(peer, request.adapter, request.start, request.end):
                    response = await asyncio.wait_for(serve(request, peer), self.request_timeout)
            await self._send(writer, response)
        elif isinstance(request, LoraUploadRequest):
            self._check_model(request.model)
            self._check_accepting()
            if self.adapters is None:
                raise BadRequestError("this server does not accept client adapters")
            await self._send(writer, LoraUploadResponse(self.adapters.upload(peer, request)))
        elif isinstance(request, LoraReleaseRequest):
            self._check_model(request.model)
            released = self.adapters is not None and self.adapters.release(peer, request.name)
            await self._send(writer, LoraReleaseResponse(released))
        elif isinstance(request, InferenceOpen):
            await self._inference(peer, request, reader, writer)
        else:
            raise BadRequestError(f"{type(request).__name__} cannot start a call")

    async def _inference(self, peer: str, request: InferenceOpen, reader, writer) -> None:
        self._check_model(request.model)
        self._check_accepting()
        self.backend.check_range(request.start, request.end)
        if not 1 <= request.max_length <= self.inference_max_length:
            raise SessionLengthError(
                f"max_length {request.max_length} is outside [1, {self.inference_max_length}] (this server's "
                "--inference_max_length)"
            )
        if not 1 <= request.batch_size <= self.max_batch_size:
            raise BadRequestError(f"batch_size {request.batch_size} is outside [1, {self.max_batch_size}]")
        adapter = self._use_adapter(peer, request.adapter, request.start, request.end)  # checked before any cache
        cache_size = request.batch_size * request.max_length * (request.end - request.start)
        async with self.memory.reserve(cache_size):
            session = self.backend.open_session(request.start, request.end, request.batch_size, request.max_length)
            self.active_sessions += 1
            logger.info(
                "Opened a session for %s: blocks [%d, %d), batch %d, max_length %d",
                peer, request.start, request.end, request.batch_size, request.max_length,
            )  # fmt: skip
            try:
                await self._send(writer, InferenceOpened(dtype_name(self.backend.dtype), request.max_length))
                with adapter:
                    await self._steps(session, reader, writer)
            finally:
                self.active_sessions -= 1
                del session
                logger.info("Closed a session for %s", peer)

    async def _steps(self, session, reader, writer) -> None:
        while True:
            try:
                step = await asyncio.wait_for(read_message(reader, self.max_bytes), self.session_timeout)
            except asyncio.TimeoutError:
                raise ServerBusyError(f"no step for {self.session_timeout:.0f} s; session closed") from None
            if not isinstance(step, (InferenceStep, InferencePromptStep)):
                raise BadRequestError(f"expected InferenceStep, got {type(step).__name__}")
            prompts = step.prompts if isinstance(step, InferencePromptStep) else None
            self._check_accepting()
            try:
                out = await asyncio.wait_for(
                    self.backend.inference_step(
                        session, step.offset, step.hidden, step.positions, step.attention_mask, prompts
                    ),
                    self.request_timeout,
                )
            except RemoteError as e:  # a well-framed bad step: answer and keep the session
                await self._answer_error(writer, e, "")
                continue
            await self._send(writer, InferenceStepResult(out))

    def _use_adapter(self, peer: str, name: str, start: int, end: int) -> AbstractContextManager:
        """Makes the blocks apply adapter ``name`` ("" = none) in compute jobs submitted inside it."""
        if not name:
            return nullcontext()
        if self.adapters is None:
            raise UnknownAdapterError(f"adapter {name!r} is not served here (this server serves no adapters)")
        return use_adapter(self.adapters.resolve(peer, name, start, end))

    def _client_adapter(self, peer: str, request: TrainForwardRequest | BackwardRequest):
        if not request.adapter or self.adapters is None:
            return None
        return self.adapters.client_weights(peer, request.adapter, request.start, request.end)

    def _check_model(self, model: ModelRef) -> None:
        if model != self.model:
            raise ServerRefusedError(
                f"this server serves {self.model.dht_prefix!r} (config hash {self.model.config_hash[:12]}), "
                f"not {model.dht_prefix!r} (config hash {model.config_hash[:12]})"
            )

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise ServerBusyError("this server is shutting down")

    async def _send(self, writer, message) -> None:
        await write_message(writer, message, max_bytes=self.max_bytes)

    async def _answer_error(self, writer, error: Exception, peer: str) -> None:
        if isinstance(error, RemoteError):
            code, message = error.code, error.message
            logger.info("Refused a request from %s: %s", peer or "a client", message)
        elif isinstance(error, asyncio.TimeoutError):
            code, message = ServerBusyError.code, f"request took over {self.request_timeout:.0f} s"
        else:
            code, message = "internal", f"{type(error).__name__}: {error}"
            logger.exception("Error while serving %s", peer or "a client", exc_info=error)
        try:
            await write_message(writer, ErrorResponse(code, message), max_bytes=self.max_bytes)
        except (ConnectionError, RuntimeError, OSError):
            pass

    async def drain(self, grace: float) -> None:
        """Stop accepting new work and wait up to ``grace`` seconds for in-flight calls to finish."""
        self.accepting = False
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace)
            for task in pending:  # idle sessions: their clients see EOF and fail over
                task.cancel()
