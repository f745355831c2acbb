"""RPC handlers: read a call's first frame, check it, serve it, answer errors as ``ErrorResponse``.

A failure in one call never reaches another: every handler catches what its call raised, answers
with the error's code and message (unexpected exceptions become ``internal`` and are logged), and
closes only its own stream. Framing errors leave the stream out of sync, so they end the call; a
well-framed but invalid inference step is answered with an error and the session stays usable.

How a call starts (membership in a private swarm, the first request) and ends (the caller hangs up first) is
:mod:`corolla.server.admission`'s.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from corolla.models.lora import use_adapter
from corolla.server.adapters import AdapterStore, lora_backward, lora_forward
from corolla.server.admission import read_request, wait_for_hang_up
from corolla.server.backend import BlockBackend
from corolla.server.backward import TrainingBackend
from corolla.server.client_limits import Holding, PeerCounter
from corolla.server.compute import current_client
from corolla.server.config import LimitsConfig
from corolla.server.memory_cache import MemoryCache
from corolla.server.push import MAX_PUSH_HOPS, LiveSession, Pusher, SessionDirectory
from corolla.swarm.transport import Transport
from corolla.swarm.trust import SwarmKey
from corolla.wire.errors import (
    BadRequestError,
    ClientLimitError,
    RemoteError,
    ServerBusyError,
    ServerRefusedError,
    SessionLengthError,
    UnknownAdapterError,
)
from corolla.wire.framing import read_message, write_message
from corolla.wire.messages import (
    BackwardRequest,
    BackwardResponse,
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
    PushedStep,
    TrainForwardRequest,
)
from corolla.wire.records import ServerInfo
from corolla.wire.tensors import COMPRESSIONS, dtype_name

logger = logging.getLogger(__name__)

#: push streams that may be open to one session at once (its pusher keeps one, and opens another after a failure)
MAX_PUSH_STREAMS = 4
#: this call's place in its caller's bound on open calls (a push stream gives it back: see _pushes)
_call_holding: contextvars.ContextVar[Holding | None] = contextvars.ContextVar("corolla_call", default=None)


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
        transport: Transport | None = None,
        limits: LimitsConfig = LimitsConfig(),
        swarm_key: SwarmKey | None = None,
    ):
        self.backend, self.memory, self.model, self.get_info = backend, memory, model, get_info
        self.adapters = adapters
        #: opens streams to other servers, for pushing steps (None: this server does not push)
        self.transport = transport
        #: a private swarm's key: every call must start with the caller's member proof (None: an open swarm)
        self.swarm_key = swarm_key
        self.sessions = SessionDirectory()
        self.inference_max_length = inference_max_length
        self.max_batch_size = max_batch_size
        self.request_timeout = request_timeout
        self.session_timeout = session_timeout
        self.max_bytes = max_message_bytes
        self.training = TrainingBackend(backend, max_batch_size=max_batch_size, max_length=inference_max_length)
        self.accepting = True
        self.active_sessions = 0
        # per-client bounds (the KV-cache share is the MemoryCache's, the compute jobs' the ComputeWorker's)
        self.client_calls = PeerCounter(limits.max_client_calls, lambda held, limit: ServerBusyError(
            f"this client has {held} calls open here, the most one client may have (--max_client_calls {limit})"
        ))  # fmt: skip
        self.client_sessions = PeerCounter(limits.max_client_sessions, lambda held, limit: ClientLimitError(
            f"this client has {held} inference sessions open or waiting here, the most one client may have "
            f"(--max_client_sessions {limit}); close one first"
        ))  # fmt: skip
        self.push_streams = PeerCounter(MAX_PUSH_STREAMS, lambda held, limit: ServerBusyError(
            f"{held} push streams are open to this session already, the most allowed ({limit})"
        ))  # fmt: skip
        self._tasks: set[asyncio.Task] = set()
        #: message type that starts a call -> its handler (peer, request, reader, writer)
        self._handlers = {
            PingRequest: self._ping,
            InfoRequest: self._info,
            ProbeRequest: self._probe,
            ForwardRequest: self._forward,
            TrainForwardRequest: self._training,
            BackwardRequest: self._training,
            LoraUploadRequest: self._lora_upload,
            LoraReleaseRequest: self._lora_release,
            InferenceOpen: self._inference,
            PushedStep: self._pushes,
        }

    async def __call__(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(stream_info.peer_id)
        try:
            call = self.client_calls.acquire(peer)
        except ServerBusyError as e:  # closed at once: waiting for its hang-up would hold what the bound frees
            await self._answer_error(writer, e, peer)
            writer.close()
            return
        _call_holding.set(call)
        current_client.set(peer)  # this call's compute jobs are the peer's (fair turns, --max_client_jobs)
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            try:
                await self._serve(peer, reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the client went away; its session (if any) is already released
            except Exception as e:
                await self._answer_error(writer, e, peer)
            if not writer.is_closing():
                await wait_for_hang_up(reader, self.request_timeout)
        finally:
            call.release()
            self._tasks.discard(task)
            if not writer.is_closing():
                writer.close()

    async def _serve(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader, peer, self.swarm_key, self.max_bytes, self.request_timeout)
        handler = self._handlers.get(type(request))
        if handler is None:
            raise BadRequestError(f"{type(request).__name__} cannot start a call")
        await handler(peer, request, reader, writer)

    # -- one handler per message type that starts a call ---------------------------------------------

    async def _ping(self, peer: str, request: PingRequest, reader, writer) -> None:
        await self._send(writer, PingResponse(time.time()))

    async def _info(self, peer: str, request: InfoRequest, reader, writer) -> None:
        await self._send(writer, InfoResponse(self.get_info()))

    async def _probe(self, peer: str, request: ProbeRequest, reader, writer) -> None:
        """Another server measuring its bandwidth to us."""
        await self._send(writer, ProbeResponse(len(request.payload)))

    async def _forward(self, peer: str, request: ForwardRequest, reader, writer) -> None:
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

    async def _training(self, peer: str, request: TrainForwardRequest | BackwardRequest, reader, writer) -> None:
        self._check_model(request.model)
        self._check_accepting()
        response = await asyncio.wait_for(self._training_call(peer, request), self.request_timeout)
        await self._send(writer, response)

    async def _lora_upload(self, peer: str, request: LoraUploadRequest, reader, writer) -> None:
        self._check_model(request.model)
        self._check_accepting()
        if self.adapters is None:
            raise BadRequestError("this server does not accept client adapters")
        await self._send(writer, LoraUploadResponse(self.adapters.upload(peer, request)))

    async def _lora_release(self, peer: str, request: LoraReleaseRequest, reader, writer) -> None:
        self._check_model(request.model)
        released = self.adapters is not None and self.adapters.release(peer, request.name)
        await self._send(writer, LoraReleaseResponse(released))

    def _training_call(self, peer: str, request: TrainForwardRequest | BackwardRequest):
        """The coroutine that answers a training call, by whose adapter it names: the client's own LoRA
        (its gradients go back too; a forward with a graph id keeps its graph over the LoRA), a served
        adapter, or none."""
        own = self._client_adapter(peer, request)
        if own is not None and isinstance(request, BackwardRequest):
            return lora_backward(self.training, own, request, peer)
        if own is not None and request.graph_id:
            return lora_forward(self.training, own, request, peer)
        serve = self.training.forward if isinstance(request, TrainForwardRequest) else self.training.backward

        async def base() -> ForwardResponse | BackwardResponse:
            with self._use_adapter(peer, request.adapter, request.start, request.end):
                return await serve(request, peer)

        return base()

    async def _inference(self, peer: str, request: InferenceOpen, reader, writer) -> None:
        """A session: opened by this message, then one step per message until the client closes it."""
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
        if request.compression and request.compression not in COMPRESSIONS:
            raise BadRequestError(
                f"unknown compression {request.compression!r}; supported: {', '.join(COMPRESSIONS)}"
            )
        adapter = self._use_adapter(peer, request.adapter, request.start, request.end)  # checked before any cache
        cache_size = request.batch_size * request.max_length * (request.end - request.start)
        # bounded per client: sessions, and their share of the cache (held or waited for), refused at once
        async with self.client_sessions.acquire(peer), self.memory.reserve(cache_size, client=peer):
            session = self.backend.open_session(request.start, request.end, request.batch_size, request.max_length)
            self.active_sessions += 1
            logger.info(
                "Opened a session for %s: blocks [%d, %d), batch %d, max_length %d",
                peer, request.start, request.end, request.batch_size, request.max_length,
            )  # fmt: skip
            live = None
            if request.session_id or request.push_token:  # steps may also come pushed by the previous server
                live = self.sessions.register(
                    request.session_id, request.push_token, session, self.backend.hidden_size
                )
            pusher = Pusher(self.transport, self.max_bytes) if self.transport is not None else None
            try:
                await self._send(writer, InferenceOpened(dtype_name(self.backend.dtype), request.max_length))
                with adapter:
                    await self._steps(session, reader, writer, live, pusher, request.compression or None)
            finally:
                if live is not None:
                    self.sessions.unregister(request.session_id)
                if pusher is not None:
                    pusher.close()
                self.active_sessions -= 1
                session.close()  # its caches are freed now, not when the last reference goes
                del session
                logger.info("Closed a session for %s", peer)

    async def _steps(
        self, session, reader, writer, live: LiveSession | None, pusher: Pusher | None, compression: str | None
    ) -> None:
        """Run the session's steps, from its client's stream and (with ``live``) pushed by another server, in
        arrival order; each ``step_id`` at most once."""
        done_ids: collections.deque[int] = collections.deque(maxlen=64)
        read: asyncio.Future | None = None
        pushed: asyncio.Future | None = None
        try:
            while True:
                if read is None:
                    read = asyncio.ensure_future(read_message(reader, self.max_bytes))
                if live is not None and pushed is None:
                    pushed = asyncio.ensure_future(live.inbox.get())
                waiting = {read} if pushed is None else {read, pushed}
                done, _ = await asyncio.wait(
                    waiting, timeout=self.session_timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    raise ServerBusyError(f"no step for {self.session_timeout:.0f} s; session closed")
                if pushed is not None and pushed in done:
                    step, pushed, from_push = pushed.result(), None, True
                else:
                    step, read, from_push = read.result(), None, False
                if not isinstance(step, (InferenceStep, InferencePromptStep, PushedStep)):
                    raise BadRequestError(f"expected InferenceStep, got {type(step).__name__}")
                if step.step_id and step.step_id in done_ids:
                    continue  # arrived both pushed and relayed: computed once, answered once
                await self._step(session, step, writer, from_push, pusher, compression)
                if step.step_id:
                    done_ids.append(step.step_id)
        finally:
            pending = [task for task in (read, pushed) if task is not None]
            for task in pending:
                task.cancel()
            if pending:  # a cancelled read must let go of the reader before the caller's hang-up is awaited
                await asyncio.wait(pending)

    async def _step(self, session, step, writer, from_push: bool, pusher: Pusher | None, compression) -> None:
        prompts = step.prompts if isinstance(step, InferencePromptStep) else None
        push = () if isinstance(step, InferencePromptStep) else step.push
        self._check_accepting()
        try:
            if push and pusher is None:
                raise BadRequestError("this server cannot push steps to other servers")
            if len(push) > MAX_PUSH_HOPS:
                raise BadRequestError(f"a step may be pushed through at most {MAX_PUSH_HOPS} more hops")
            hypo_ids = None if isinstance(step, InferencePromptStep) else step.hypo_ids
            out = await asyncio.wait_for(
                self.backend.inference_step(
                    session, step.offset, step.hidden, step.positions, step.attention_mask, prompts, hypo_ids
                ),
                self.request_timeout,
            )
        except RemoteError as e:
            if from_push:  # its client relays this hop after its deadline
                logger.info("Dropped a pushed step: %s", e.message)
            else:  # a well-framed bad step: answer and keep the session
                await self._answer_error(writer, e, "")
            return
        if push:  # the next server first: it is on the critical path
            target = push[0]
            pusher.push(target, PushedStep(
                target.session_id, target.token, step.step_id, step.offset, out, step.positions,
                step.attention_mask, push[1:], step.hypo_ids,
            ), compression)  # fmt: skip
        await self._send(writer, InferenceStepResult(out, step.step_id), compression)

    async def _pushes(self, peer: str, first: PushedStep, reader, writer) -> None:
        """A push stream from another server: deliver each step to its session; a refused one ends it.

        It leaves its pusher's bound on open calls: a server pushes over one stream per session it serves, for
        many clients. Instead at most MAX_PUSH_STREAMS are open to one session (the session it first feeds),
        and each ends after ``session_timeout`` without a step."""
        holding = _call_holding.get()
        if holding is not None:
            holding.release()
        step, stream = first, Holding(None, None)
        try:
            while True:
                try:
                    if step is first:
                        stream = self.push_streams.acquire(first.session_id)
                    self.sessions.deliver(step)
                except RemoteError as e:
                    await self._answer_error(writer, e, peer)
                    # The pusher reads no replies: close now (not after its hang-up, which would swallow its next
                    # pushes), so that its next step finds the stream gone and opens a new one.
                    writer.close()
                    return
                step = await asyncio.wait_for(read_message(reader, self.max_bytes), self.session_timeout)
                if not isinstance(step, PushedStep):
                    raise BadRequestError(f"a push stream carries PushedStep only, got {type(step).__name__}")
        finally:
            stream.release()

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

    async def _send(self, writer, message, compression: str | None = None) -> None:
        await write_message(writer, message, compression, max_bytes=self.max_bytes)

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
