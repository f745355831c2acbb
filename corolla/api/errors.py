"""Errors in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

Every failure the API reports, from a malformed body to a swarm that lacks blocks, is an `ApiError`;
`from_exception` maps the client's errors (``corolla.MissingBlocksError`` and friends) onto statuses
that OpenAI clients understand (503 for an unavailable swarm: clients retry those).
"""

from __future__ import annotations

from corolla.wire.errors import (
    CacheFullError,
    ChainFailedError,
    ClientLimitError,
    MissingBlocksError,
    ServerBusyError,
    SessionLengthError,
)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def from_exception(error: BaseException) -> ApiError:
    """The API error for an exception raised while generating."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, MissingBlocksError):
        return ApiError(
            503,
            f"the swarm cannot serve this model right now: {error}",
            type="service_unavailable_error",
            code="missing_blocks",
        )
    if isinstance(error, (CacheFullError, ClientLimitError, ServerBusyError, ChainFailedError)):
        return ApiError(503, f"the swarm cannot serve this request right now: {error}",
                        type="service_unavailable_error", code="swarm_unavailable")  # fmt: skip
    if isinstance(error, SessionLengthError):
        return ApiError(400, str(error), code="context_length_exceeded", param="messages")
    return ApiError(500, f"internal error: {type(error).__name__}: {error}", type="server_error", code=None)
