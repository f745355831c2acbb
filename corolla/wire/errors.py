"""Errors a user can act on, and the codes that carry them across the wire.

A server answers a bad or unserviceable request with an ``ErrorResponse(code, message)``; the client
turns the code back into the exception class below, so ``except CacheFullError`` works on the client
for a cache that filled up on a server. Codes are stable strings, part of the wire protocol.
"""

from __future__ import annotations


class CorollaError(Exception):
    """Base class of every error corolla raises on purpose."""


class RemoteError(CorollaError):
    """A server answered with an error. ``code`` says what kind; ``peer`` which server, when known."""

    code = "internal"

    def __init__(self, message: str, peer: str | None = None):
        super().__init__(message if peer is None else f"{message} (server {peer})")
        self.message = message
        self.peer = peer


class BadRequestError(RemoteError):
    """A message was malformed, oversized, or had a wrong shape, dtype or block index."""

    code = "bad_request"


class ServerRefusedError(RemoteError):
    """The server serves another model (config hash / DHT prefix) or speaks another wire version."""

    code = "refused"


class CacheFullError(RemoteError):
    """The server's KV-cache budget stayed full for longer than its allocation timeout."""

    code = "cache_full"


class SessionLengthError(RemoteError, ValueError):
    """A step would go past the session's max length, or the max length is over the server's limit."""

    code = "too_long"


class ServerBusyError(RemoteError):
    """The server is shutting down or overloaded; try another one."""

    code = "busy"


class UnknownAdapterError(RemoteError, ValueError):
    """No adapter of this name: a server does not serve it, or a client adapter was not (or no longer) uploaded."""

    code = "unknown_adapter"


class AdapterLimitError(RemoteError):
    """An uploaded client adapter would exceed the server's per-client adapter memory bound."""

    code = "adapter_limit"


class ClientLimitError(RemoteError):
    """This client already holds its share of the server (sessions, KV cache); close some, or raise the
    server's per-client limit. Refused at once, never queued."""

    code = "client_limit"


class NotAMemberError(RemoteError):
    """The server belongs to a private swarm and the caller did not prove membership (no swarm key, or
    another swarm's key), or the caller holds a key and the server runs an open swarm."""

    code = "not_a_member"


class MissingBlocksError(CorollaError):
    """No reachable server hosts some blocks, even after the bounded wait."""

    def __init__(self, blocks: list[int], dht_prefix: str, waited: float, reasons: str = ""):
        spans = _format_blocks(blocks)
        msg = f"no server of {dht_prefix!r} hosts block(s) {spans} (waited {waited:.0f} s)"
        if reasons:
            msg += f"; {reasons}"
        super().__init__(msg)
        self.blocks = blocks
        self.dht_prefix = dht_prefix


class ChainFailedError(CorollaError):
    """A span of the chain kept failing on every server that could serve it, past the retry budget."""


def _format_blocks(blocks: list[int]) -> str:
    parts, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            parts.append(f"{start}" if start == b else f"{start}-{b}")
            start = None
    return ", ".join(parts)


ERROR_CLASSES: dict[str, type[RemoteError]] = {
    cls.code: cls
    for cls in (
        RemoteError,
        BadRequestError,
        ServerRefusedError,
        CacheFullError,
        SessionLengthError,
        ServerBusyError,
        UnknownAdapterError,
        AdapterLimitError,
        ClientLimitError,
        NotAMemberError,
    )
}


def error_from_code(code: str, message: str, peer: str | None = None) -> RemoteError:
    return ERROR_CLASSES.get(code, RemoteError)(message, peer)
