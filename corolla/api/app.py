"""The HTTP shell: FastAPI routes, API-key check, OpenAI error bodies, server-sent events.

- Routes: ``GET /`` (the web chat), ``GET /v1/models``, ``GET /v1/models/{id}``,
  ``POST /v1/chat/completions``, ``POST /v1/completions``.
- Bodies are parsed here (not by FastAPI's models) so that every malformed request gets OpenAI's
  error format and a 400, never FastAPI's 422.
- **Errors before the first token keep their status.** A request waits for its generation's first
  event (the first token, or an error such as missing blocks) before answering, so a swarm that
  cannot serve it is a 503 even for ``stream: true``. An error after streaming began is sent as a
  final ``data: {"error": ...}`` event, as OpenAI does.
- **Disconnects.** A streamed response is cancelled by Starlette when its client goes away; a
  non-streamed one polls for the disconnect while it waits. Both cancel the job (see `engine`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corolla.api.chat_page import chat_page
from corolla.api.engine import Done, Engine, Job, Step
from corolla.api.errors import ApiError
from corolla.api.responses import Formatter, sse
from corolla.api.schemas import check_model, parse_chat_request, parse_completion_request

logger = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.5


def create_app(engine: Engine, model_names: tuple[str, ...], api_key: str | None = None) -> FastAPI:
    """``model_names[0]`` is the id listed by /v1/models; requests may use any of the names."""
    app = FastAPI(title="corolla OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    model_id = model_names[0]

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        body = ApiError(
            error.status_code, f"{request.method} {request.url.path}: {error.detail}", type=kind
        ).body()
        return JSONResponse(body, status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("Unexpected error answering %s %s", request.method, request.url.path)
        body = ApiError(500, f"internal error: {type(error).__name__}: {error}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "You didn't provide an API key: send 'Authorization: Bearer KEY'.",
                           type="authentication_error", code="missing_api_key")  # fmt: skip
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", type="authentication_error", code="invalid_api_key")

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "corolla"}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(chat_page(model_id, api_key_required=api_key is not None))

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request) -> dict:
        authorize(request)
        check_model(name, model_names)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = parse_chat_request(await _json(request))
        check_model(req.model, model_names)
        job = engine.submit(engine.chat_prompt(req.messages), req.params, "messages")
        return await _respond(request, job, Formatter(True, model_id, req.params))

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        req = parse_completion_request(await _json(request))
        check_model(req.model, model_names)
        job = engine.submit(engine.completion_prompt(req.prompt), req.params, "prompt")
        return await _respond(request, job, Formatter(False, model_id, req.params))

    return app


async def _json(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(
            400, f"We could not parse the JSON body of your request: {e}", code="invalid_json"
        ) from None


async def _respond(request: Request, job: Job, fmt: Formatter):
    waiter = _Waiter(request, job)
    try:
        first = await waiter.next()
    except BaseException:
        job.cancel()
        raise
    if first is None:  # the client left before the first token
        return JSONResponse(ApiError(499, "client closed the request").body(), status_code=499)
    if fmt.params.stream:
        return StreamingResponse(
            _stream(job, fmt, first),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    deltas, event = [], first
    try:
        while not isinstance(event, Done):
            deltas.extend(event.deltas)
            event = await waiter.next()
            if event is None:
                return JSONResponse(ApiError(499, "client closed the request").body(), status_code=499)
    finally:
        if not isinstance(event, Done):
            job.cancel()
    return JSONResponse(fmt.complete(deltas, event))


class _Waiter:
    """A job's next event, or None once its client has disconnected (the job is then cancelled).

    The disconnect is checked at least every DISCONNECT_POLL_SECONDS, also while events keep coming.
    """

    def __init__(self, request: Request, job: Job):
        self.request, self.job, self.check_at = request, job, 0.0

    async def next(self):
        while True:
            if time.monotonic() >= self.check_at:
                self.check_at = time.monotonic() + DISCONNECT_POLL_SECONDS
                if await self.request.is_disconnected():
                    logger.info("Request %s: client disconnected, stopping its generation", self.job.id)
                    self.job.cancel()
                    return None
            try:
                return await asyncio.wait_for(self.job.next(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:
                continue


async def _stream(job: Job, fmt: Formatter, first):
    """SSE events of a job. A chunk that finishes a choice is held until the next event, so that the last
    chunk can carry the end-of-stream extras (see `Formatter.finish`); text is never held."""
    event, failed, held = first, False, None
    try:
        for chunk in fmt.first_chunks(first.route if isinstance(first, Step) else None):
            yield sse(chunk)
        while not isinstance(event, Done):
            chunk = fmt.step_chunk(event)
            if chunk is not None:
                if held is not None:
                    yield sse(held)
                    held = None
                if any(c["finish_reason"] for c in chunk["choices"]):
                    held = chunk
                else:
                    yield sse(chunk)
            try:
                event = await job.next()
            except ApiError as e:  # after the first token: the status is sent already; OpenAI sends an event
                failed = True
                if held is not None:
                    yield sse(held)
                yield sse(e.body())
                return
        for chunk in fmt.finish(held, event):
            yield sse(chunk)
        yield sse("[DONE]")
    finally:
        if not isinstance(event, Done) and not failed:
            logger.info("Request %s: client disconnected mid-stream, stopping its generation", job.id)
            job.cancel()
