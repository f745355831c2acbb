"""corolla's wire protocol: typed messages, DHT records, tensor encoding, framing, error codes.

This package imports nothing else of corolla and opens no sockets.
"""

from corolla.wire.errors import (
    BadRequestError,
    CacheFullError,
    ChainFailedError,
    CorollaError,
    MissingBlocksError,
    RemoteError,
    ServerBusyError,
    ServerRefusedError,
    SessionLengthError,
)
from corolla.wire.records import WIRE_VERSION, ServerInfo, ServerState

__all__ = [
    "BadRequestError",
    "CacheFullError",
    "ChainFailedError",
    "CorollaError",
    "MissingBlocksError",
    "RemoteError",
    "ServerBusyError",
    "ServerInfo",
    "ServerRefusedError",
    "ServerState",
    "SessionLengthError",
    "WIRE_VERSION",
]
