"""Typed dataclasses <-> msgpack bytes, checked against the field annotations on the way in.

A message is a frozen dataclass. On the wire it is a msgpack array of its field values in declared
order (no field names, no free-form dicts). Decoding walks the annotations and rejects anything that
does not fit: a wrong type, a wrong arity, an unknown enum value, an oversized tensor. msgpack is
unpacked with hard limits and no extension types, so nothing received can build arbitrary objects. The
arrays of one message hold at most :data:`MAX_ITEMS` items in all: without that bound, nested empty
arrays (one byte each) made a 4 MiB payload cost 260 MiB of Python lists.

Supported field types: ``int``, ``float``, ``str``, ``bool``, ``bytes``, ``torch.Tensor``, ``str``
enums, nested message dataclasses, ``X | None``, ``tuple[X, ...]`` and ``tuple[X, Y]``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any, TypeVar

import msgpack
import torch

from corolla.wire.errors import BadRequestError
from corolla.wire.tensors import decode_tensor, encode_tensor

T = TypeVar("T")

#: Items in all the arrays of one message; the largest real messages (LoRA uploads) hold tens of thousands.
MAX_ITEMS = 1 << 18


def to_obj(value: Any, compression: str | None = None) -> Any:
    """A dataclass tree -> plain msgpack-able lists (tensors become [dtype, shape, wire_dtype, bytes])."""
    if dataclasses.is_dataclass(value):
        return [to_obj(getattr(value, f.name), compression) for f in dataclasses.fields(value)]
    if isinstance(value, torch.Tensor):
        return encode_tensor(value, compression)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [to_obj(v, compression) for v in value]
    return value


def pack(message: Any, compression: str | None = None) -> bytes:
    return msgpack.packb(to_obj(message, compression), use_bin_type=True)


class _ItemBudget:
    """msgpack's ``list_hook``: counts the items of every array built and stops the unpacking past the budget."""

    def __init__(self, budget: int):
        self.left = budget

    def __call__(self, items: list) -> list:
        self.left -= len(items) + 1
        if self.left < 0:
            raise ValueError(f"more than {MAX_ITEMS} array items in one message")
        return items


def unpack(cls: type[T], data: bytes, max_tensor_bytes: int) -> T:
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=len(data),
            max_str_len=1 << 20,
            max_array_len=1 << 16,
            max_map_len=0,
            max_ext_len=0,
            list_hook=_ItemBudget(MAX_ITEMS),
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise BadRequestError(f"malformed {cls.__name__}: {e}") from None
    return from_obj(cls, obj, max_tensor_bytes)


def from_obj(cls: type[T], obj: Any, max_tensor_bytes: int, where: str = "") -> T:
    where = where or cls.__name__
    fields = dataclasses.fields(cls)
    if not isinstance(obj, list) or len(obj) != len(fields):
        raise BadRequestError(f"{where}: expected {len(fields)} fields, got {_describe(obj)}")
    hints = _hints(cls)
    values = {
        f.name: _convert(hints[f.name], v, max_tensor_bytes, f"{where}.{f.name}") for f, v in zip(fields, obj)
    }
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise BadRequestError(f"{where}: {e}") from None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(tp: Any, v: Any, max_tensor_bytes: int, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, v, max_tensor_bytes, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(v, list):
            raise BadRequestError(f"{where}: expected a list, got {_describe(v)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], x, max_tensor_bytes, f"{where}[{i}]") for i, x in enumerate(v))
        if len(v) != len(args):
            raise BadRequestError(f"{where}: expected {len(args)} items, got {len(v)}")
        return tuple(_convert(a, x, max_tensor_bytes, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, v)))
    if tp is torch.Tensor:
        try:
            return decode_tensor(v, max_tensor_bytes)
        except BadRequestError as e:
            raise BadRequestError(f"{where}: {e.message}") from None
    if dataclasses.is_dataclass(tp):
        return from_obj(tp, v, max_tensor_bytes, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(v)
        except ValueError:
            raise BadRequestError(f"{where}: unknown value {v!r}") from None
    if tp is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if tp in (int, float, str, bool, bytes) and type(v) is tp:
        return v
    raise BadRequestError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {_describe(v)}")


def _describe(v: Any) -> str:
    return f"{type(v).__name__} of length {len(v)}" if isinstance(v, (list, str, bytes)) else type(v).__name__
