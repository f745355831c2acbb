"""Weight-only quantization of a `BlockStack`'s linear layers: `none`, `int8`, `nf4` (Petals' names).

Public API::

    QUANT_TYPES = ("none", "int8", "nf4")
    quantize_stack(stack, quant_type) -> int        # replaces nn.Linear modules in place; returns how many
    quantize_layers(layers, quant_type) -> int      # the same on some blocks (e.g. a sub-range)
    weight_bytes(module) -> int                      # bytes of every parameter and buffer (resident weights)

On CPU (our own code, plain public torch ops):

- **int8** (`Int8Linear`): per-output-channel symmetric scale `absmax(row) / 127`, weights stored as
  int8 (1 byte per weight plus one fp32 scale per row: about half of bf16, a quarter of fp32).
  Forward: `linear(x, int8 -> x.dtype) * scale + bias` (the scale is per output, so it applies after the
  matmul: no dequantized weight copy beyond the cast).
- **nf4** (`NF4Linear`): 4-bit NormalFloat (QLoRA): blocks of 64 consecutive weights (row-major), each
  scaled by its absmax into [-1, 1] and rounded to the nearest of 16 levels that are quantiles of a
  standard normal (computed here from the paper's recipe, `nf4_levels`); two 4-bit codes per uint8,
  one fp32 absmax per block (0.5625 bytes per weight: ~1/7 of fp32). Forward dequantizes the weight
  in the activation dtype and runs one `linear`.

On CUDA, when bitsandbytes is importable, its `Linear8bitLt` (LLM.int8) and `Linear4bit` (nf4) are used
instead; without it, a CUDA stack falls back to the same torch modules (which run on any device).

Each quantized module is a plain `nn.Module` with `in_features`, `out_features` and `forward(x)`, so
wrappers (LoRA, `corolla.models.lora`) can call it; the original float weight is released (the module
that held it is replaced and nothing else references it). Biases stay in the stack's dtype. Routers of
mixture-of-experts blocks (`moe.router`) stay in full precision: they are tiny and choose experts, so
rounding them would change which experts run.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

QUANT_TYPES = ("none", "int8", "nf4")
#: approximate resident bytes per weight of a quantized matrix (scales included), for memory planning
QUANT_BYTES_PER_WEIGHT = {"int8": 1.02, "nf4": 0.5625}
NF4_BLOCK = 64
#: module names (last path component) never quantized
KEEP_FULL_PRECISION = ("router",)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of `module` (its resident weights)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class Int8Linear(nn.Module):
    """y = (x @ q.T) * scale + bias with q int8 [out, in] and one scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.register_buffer("qweight", torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.float() * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat4 levels: 8 positive and 7 negative normal quantiles (from the QLoRA paper's
    construction, offset 0.9677), zero, normalised to [-1, 1]; ascending, fp32."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (levels / levels.abs().max()).float()


_NF4 = nf4_levels()
# byte -> (level of its high 4 bits, level of its low 4 bits): one gather dequantizes two weights
_NF4_PAIRS = torch.stack((_NF4[torch.arange(256) >> 4], _NF4[torch.arange(256) & 0x0F]), dim=1)
_ON_DEVICE: dict[tuple[str, torch.device], torch.Tensor] = {}


def _on(name: str, device: torch.device) -> torch.Tensor:
    """A level table on `device` (one shared copy per device, not a per-module buffer)."""
    if (name, device) not in _ON_DEVICE:
        _ON_DEVICE[name, device] = (_NF4 if name == "levels" else _NF4_PAIRS).to(device)
    return _ON_DEVICE[name, device]


class NF4Linear(nn.Module):
    """Blockwise 4-bit NormalFloat weights (block 64, fp32 absmax per block, 2 codes per byte)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float().reshape(-1)
        numel = weight.numel()
        padded = -numel % NF4_BLOCK + numel
        blocks = F.pad(weight, (0, padded - numel)).view(-1, NF4_BLOCK)
        absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)
        normed = (blocks / absmax[:, None]).reshape(-1)
        levels = _on("levels", weight.device)
        # nearest level: bucketize against the midpoints between consecutive levels
        codes = torch.bucketize(normed, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
        self.register_buffer("packed", (codes[0::2] << 4) | codes[1::2])
        self.register_buffer("absmax", absmax)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        pairs = F.embedding(self.packed.int(), _on("pairs", self.packed.device))  # [numel / 2, 2]
        values = pairs.view(-1, NF4_BLOCK) * self.absmax[:, None]
        numel = self.in_features * self.out_features
        return values.reshape(-1)[:numel].view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={NF4_BLOCK}"


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


def _bnb_linear(bnb, linear: nn.Linear, quant_type: str) -> nn.Module:
    """bitsandbytes' CUDA modules; they quantize when moved to the GPU."""
    device = linear.weight.device
    weight = linear.weight.detach().to("cpu")
    has_bias = linear.bias is not None
    if quant_type == "int8":
        module = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0
        )
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        module = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=weight.dtype, quant_type="nf4"
        )
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if has_bias:
        module.bias = nn.Parameter(linear.bias.detach().to("cpu"), requires_grad=False)
    return module.to(device)


def quantize_linear(linear: nn.Linear, quant_type: str) -> nn.Module:
    if quant_type not in QUANT_TYPES or quant_type == "none":
        raise ValueError(f"cannot quantize to {quant_type!r}; quantized types: int8, nf4")
    if linear.weight.device.type == "cuda":
        bnb = _bitsandbytes()
        if bnb is not None:
            return _bnb_linear(bnb, linear, quant_type)
    return Int8Linear(linear) if quant_type == "int8" else NF4Linear(linear)


def quantize_layers(layers, quant_type: str) -> int:
    """Replace every `nn.Linear` in `layers` (blocks; routers excepted) by its `quant_type` form, one at a
    time so that at most one extra float weight is alive; returns the number replaced."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")
    if quant_type == "none":
        return 0
    count = 0
    for layer in layers:
        targets = [
            name
            for name, module in layer.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in KEEP_FULL_PRECISION
        ]
        for name in targets:
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, attr, quantize_linear(getattr(parent, attr), quant_type))
            count += 1
    return count


def release_freed_memory() -> None:
    """Give the freed float weights back to the OS (glibc keeps freed heap pages otherwise, and the
    server's RSS would not show the saving); a no-op elsewhere."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def quantize_stack(stack: nn.Module, quant_type: str) -> int:
    """Quantize the linears of every block of a `BlockStack` in place (see `quantize_layers`)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")
    before = weight_bytes(stack)
    count = quantize_layers(stack.layers, quant_type)
    if count:
        release_freed_memory()
        logger.info(
            "Quantized %d linear layers to %s: weights %.1f MiB -> %.1f MiB",
            count, quant_type, before / 2**20, weight_bytes(stack) / 2**20,
        )  # fmt: skip
    stack.quant_type = quant_type
    return count
