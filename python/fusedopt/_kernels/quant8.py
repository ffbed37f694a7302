"""8-bit blockwise optimizer states (``state_dtype=torch.int8``), the host side.

A quantized state is two tensors: ``codes``, int8 like its param (same shape,
device and memory layout; each byte one element's code), and the row of the
param's ``absmax`` tensor that holds the state's block scales: float32
``[k, blocks]``, k the number of quantized states of the optimizer (Adam: 2, 3
with amsgrad; SGD, LARS: 1), blocks = ceil(numel / BLOCK) over the param's
elements in memory order. An element's value is ``decode(code) * absmax``; the
codes are small floats relative to the block's absmax, csrc/ops/quant8.h
(signed states: sign + 4 exponent + 3 mantissa bits; non-negative states: 5
exponent + 3 mantissa bits). The kernels update them in place; this module
converts whole states for checkpoints (``quantize``, ``dequantize``) with the
same C++ code, on the host.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import _C
from .checks import is_flat_run, shape_str

BLOCK: int = _C.LAYOUT["quant_block"]


def num_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def absmax_shape(p: torch.Tensor, states: int) -> Tuple[int, int]:
    return (states, num_blocks(p.numel()))


def check_absmax(t, p: torch.Tensor, states: int, what: str) -> None:
    """The block scales of p's ``states`` quantized states: contiguous float32
    ``[states, blocks]`` on p's device."""
    want = absmax_shape(p, states)
    if not isinstance(t, torch.Tensor) or t.layout is not torch.strided:
        raise TypeError(f"{what} is a {type(t).__name__}; expected a float32 tensor of shape {list(want)}")
    if t.dtype is not torch.float32 or t.device != p.device or tuple(t.shape) != want or not t.is_contiguous():
        raise ValueError(f"{what} is {shape_str(t)}; expected a contiguous float32 tensor of shape {list(want)} "
                         f"on {p.device} (the block absmax of {states} state(s) of {BLOCK}-element blocks)")


def _flat(t: torch.Tensor) -> torch.Tensor:
    """t's elements in memory order (t is dense: contiguous or channels_last)."""
    return t.as_strided((t.numel(),), (1,))


def quantize(values: torch.Tensor, like: torch.Tensor, signed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(codes like ``like``, absmax [blocks]) of fp32 ``values`` (any device and
    layout, the shape of ``like``), computed on the host, returned on like's device."""
    host = torch.empty_like(like, dtype=torch.float32, device="cpu", memory_format=torch.preserve_format)
    host.copy_(values.detach())
    if not is_flat_run(host):
        host = host.contiguous()
    codes = torch.empty_like(host, dtype=torch.int8, memory_format=torch.preserve_format)
    absmax = torch.empty(num_blocks(host.numel()), dtype=torch.float32)
    _C.quantize8(_flat(host).data_ptr(), host.numel(), _flat(codes).data_ptr(), absmax.data_ptr(), bool(signed))
    return codes.to(like.device), absmax.to(like.device)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 values (codes' shape, layout and device) of one quantized state."""
    c = codes.detach().to("cpu")
    if not is_flat_run(c):
        c = c.contiguous()
    a = absmax.detach().to("cpu", torch.float32).contiguous()
    if a.numel() != num_blocks(c.numel()):
        raise ValueError(f"absmax has {a.numel()} entries; expected {num_blocks(c.numel())} for {c.numel()} codes")
    out = torch.empty_like(c, dtype=torch.float32, memory_format=torch.preserve_format)
    _C.dequantize8(_flat(c).data_ptr(), a.data_ptr(), c.numel(), _flat(out).data_ptr(), bool(signed))
    return out.to(codes.device)
