"""hypothesis strategies for corolla's messages, drawn from the dataclasses' own annotations (every field type
the codec supports), biased towards values a server would accept (small ints, hidden-state shapes of the tiny
test models) so that fuzzing reaches past the first check."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing

import torch
from hypothesis import strategies as st

from corolla.wire.messages import MESSAGE_CLASSES
from corolla.wire.tensors import DTYPES

#: shapes of the tiny models' calls (hidden size 64): hidden states, positions / masks, hypo ids
PLAUSIBLE_SHAPES = ([1, 2, 64], [2, 3, 64], [1, 2], [2, 3], [1], [2])


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    shape = draw(st.lists(st.integers(0, 4), max_size=3) | st.sampled_from(PLAUSIBLE_SHAPES).map(list))
    numel = 1
    for d in shape:
        numel *= d
    if dtype == torch.bool:
        return torch.tensor(draw(st.lists(st.booleans(), min_size=numel, max_size=numel)), dtype=torch.bool).view(
            shape
        )
    size = torch.empty((), dtype=dtype).element_size()
    data = draw(st.binary(min_size=numel * size, max_size=numel * size))
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape) if numel else torch.empty(shape, dtype=dtype)


def strategy_for(tp) -> st.SearchStrategy:
    """Values of annotation ``tp`` that the codec accepts (the field types it supports)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return st.none() | strategy_for(inner)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(strategy_for(args[0]), max_size=3).map(tuple)
        return st.tuples(*map(strategy_for, args))
    if tp is torch.Tensor:
        return tensors()
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return st.builds(tp, *[strategy_for(hints[f.name]) for f in dataclasses.fields(tp)])
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(list(tp))
    return {
        int: st.integers(-2, 10) | st.integers(-(2**63), 2**64 - 1),
        float: st.floats(),
        str: st.text(max_size=12),
        bool: st.booleans(),
        bytes: st.binary(max_size=20),
    }[tp]


messages = st.sampled_from(sorted(MESSAGE_CLASSES.values(), key=lambda c: c.__name__)).flatmap(strategy_for)
#: any msgpack document the unpacker accepts (no maps, no extensions: those are refused as malformed)
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=20,
)  # fmt: skip
