"""Tensors on the wire: a declared dtype and shape, raw little-endian bytes, optional lossy compression.

A tensor travels as ``[dtype, shape, wire_dtype, data]``: ``dtype`` is what the sender holds and what the
receiver gets back, ``wire_dtype`` is what the bytes are (equal to ``dtype`` unless the sender chose to
compress floats to float16/bfloat16, or to ``int8_rowwise``: int8 values then one float32 scale per row of the
last dimension, for a bandwidth-bound route). The receiver validates every field
before touching the bytes: a known dtype, a bounded rank, non-negative dims, and a byte count that
matches; nothing is unpickled or evaluated. bfloat16 has no numpy dtype, so bytes are reinterpreted
through ``torch.frombuffer`` rather than numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from corolla.wire.errors import BadRequestError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_COMPRESSIONS = ("float16", "bfloat16")
#: Lossy 8-bit activations: int8 values with one float32 scale per row (absmax over the last dimension).
INT8_ROWWISE = "int8_rowwise"
COMPRESSIONS = (*FLOAT_COMPRESSIONS, INT8_ROWWISE)
MAX_RANK = 8


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be sent on the wire; supported: {sorted(DTYPES)}") from None


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise BadRequestError(f"unknown tensor dtype {name!r}; supported: {sorted(DTYPES)}") from None


def encode_tensor(tensor: torch.Tensor, compression: str | None = None) -> list:
    """Serialize ``tensor`` to ``[dtype, shape, wire_dtype, bytes]``.

    ``compression`` (``"float16"``/``"bfloat16"``) applies only to floating tensors of a wider type.
    """
    name = dtype_name(tensor.dtype)
    wire = tensor.detach()
    wire_name = name
    if compression is not None and tensor.is_floating_point() and compression != name:
        if compression == INT8_ROWWISE:
            if tensor.ndim and tensor.numel():
                return [name, list(tensor.shape), INT8_ROWWISE, _int8_rowwise(wire)]
            compression = None
        elif compression not in FLOAT_COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}; supported: {COMPRESSIONS}")
    if compression is not None and tensor.is_floating_point() and compression != name:
        wire = wire.to(DTYPES[compression])
        wire_name = compression
    wire = wire.to("cpu").contiguous()
    data = wire.reshape(-1).view(torch.uint8).numpy().tobytes() if wire.numel() else b""  # 0-dim too
    return [name, list(tensor.shape), wire_name, data]


def decode_tensor(obj: object, max_bytes: int) -> torch.Tensor:
    """Inverse of :func:`encode_tensor`, validating everything; raises :class:`BadRequestError`."""
    if not (isinstance(obj, (list, tuple)) and len(obj) == 4):
        raise BadRequestError("a tensor must be [dtype, shape, wire_dtype, data]")
    name, shape, wire_name, data = obj
    if not isinstance(name, str) or not isinstance(wire_name, str):
        raise BadRequestError("tensor dtype names must be strings")
    if wire_name == INT8_ROWWISE:
        return _from_int8_rowwise(parse_dtype(name), _check_shape(shape), data, max_bytes)
    dtype, wire_dtype = parse_dtype(name), parse_dtype(wire_name)
    if wire_dtype != dtype and not (dtype.is_floating_point and wire_name in FLOAT_COMPRESSIONS):
        raise BadRequestError(f"tensor of dtype {name} cannot travel as {wire_name}")
    shape = _check_shape(shape)
    if not isinstance(data, (bytes, bytearray)):
        raise BadRequestError("tensor data must be bytes")
    itemsize = torch.empty((), dtype=wire_dtype).element_size()
    expected = math.prod(shape) * itemsize
    if math.prod(max(d, 1) for d in shape) * itemsize > max_bytes:  # an empty tensor's other dims count too
        raise BadRequestError(f"tensor of shape {list(shape)} exceeds the limit of {max_bytes} bytes")
    if len(data) != expected:
        raise BadRequestError(
            f"tensor of shape {shape} and dtype {wire_name} needs {expected} bytes, got {len(data)}"
        )
    if wire_dtype == torch.bool and bytes(data).translate(None, b"\x00\x01"):
        raise BadRequestError("bool tensor bytes must be 0 or 1")  # torch would keep other bytes as they are
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(data), dtype=wire_dtype)
    out = flat.view(shape)
    return out.to(dtype) if wire_dtype != dtype else out


def _int8_rowwise(tensor: torch.Tensor) -> bytes:
    """int8 values (rounded to the row's absmax / 127), then the rows' float32 scales."""
    rows = tensor.to("cpu", torch.float32).reshape(-1, tensor.shape[-1])
    scale = rows.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return values.numpy().tobytes() + scale.numpy().tobytes()


def _from_int8_rowwise(dtype: torch.dtype, shape: tuple[int, ...], data: object, max_bytes: int) -> torch.Tensor:
    if not dtype.is_floating_point or not shape or not math.prod(shape):
        raise BadRequestError(f"only non-empty floating tensors of rank >= 1 travel as {INT8_ROWWISE}")
    if not isinstance(data, (bytes, bytearray)):
        raise BadRequestError("tensor data must be bytes")
    numel = math.prod(shape)
    rows = numel // shape[-1]
    expected = numel + 4 * rows
    if numel * torch.empty((), dtype=dtype).element_size() > max_bytes:
        raise BadRequestError(f"tensor of shape {list(shape)} exceeds the limit of {max_bytes} bytes")
    if len(data) != expected:
        raise BadRequestError(
            f"tensor of shape {list(shape)} as {INT8_ROWWISE} needs {expected} bytes, got {len(data)}"
        )
    buffer = bytearray(data)
    values = torch.frombuffer(buffer, dtype=torch.int8, count=numel).view(rows, shape[-1])
    scale = torch.frombuffer(buffer, dtype=torch.float32, offset=numel, count=rows)
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise BadRequestError(f"{INT8_ROWWISE} scales must be finite and positive")
    return (values.to(torch.float32) * scale[:, None]).view(shape).to(dtype)


def _check_shape(shape: object) -> tuple[int, ...]:
    if not isinstance(shape, Sequence) or isinstance(shape, (str, bytes)) or len(shape) > MAX_RANK:
        raise BadRequestError(f"tensor shape must be a list of at most {MAX_RANK} ints")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape):
        raise BadRequestError(f"tensor shape {shape!r} must hold non-negative ints")
    return tuple(shape)
