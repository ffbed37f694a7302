"""Calls into ``_C``: devices, streams, scalar pointers and the optimizer launchers.

Every optimizer entry point of ``_C`` takes the same leading arguments (rows,
dtype codes, device, pointers of the optional device scalars lr, grad_scale
and found_inf, stream), then its float hyperparameters in the order the
layout names them, then an int of option flags. Tables reach here checked.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import torch

from .. import _C
from .checks import shape_str
from .layout import DTYPE_CODES
from .rows import RowTable


class DeviceScalars(NamedTuple):
    """The per-call scalars of one device: lr (a float, or a one-element fp32
    tensor the kernel reads), AMP's grad_scale (a divisor) and found_inf; and
    the call's stochastic-rounding seed: a host int, or the three int64 words
    (seed, step, stream) on this device that the kernel derives it from (both
    None: round to nearest)."""
    lr: float
    lr_tensor: Optional[torch.Tensor]
    grad_scale: Optional[torch.Tensor]
    found_inf: Optional[torch.Tensor]
    rounding_seed: Optional[int] = None
    rounding_words: Optional[torch.Tensor] = None


def device_index(device: torch.device) -> int:
    return -1 if device.type == "cpu" else (device.index if device.index is not None else torch.cuda.current_device())


def stream_of(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def scalar_pointer(t: Optional[torch.Tensor], device: torch.device, what: str) -> int:
    """Pointer to a one-element fp32 tensor on ``device`` (0 for None)."""
    if t is None:
        return 0
    if t.numel() != 1 or t.dtype is not torch.float32 or t.device != device:
        raise ValueError(f"{what} must be a one-element float32 tensor on {device}; got {shape_str(t)}")
    return t.data_ptr()


def require_cuda(device: torch.device) -> None:
    if device.type == "cuda" and not _C.cuda_compiled():
        raise RuntimeError("this fusedopt build has no CUDA kernels; reinstall with nvcc available (FUSEDOPT_CUDA=on)")


def _head(table: RowTable, state_dtype: torch.dtype, s: DeviceScalars) -> tuple:
    dev = table.device
    return (table.rows, DTYPE_CODES[table.dtype], DTYPE_CODES[state_dtype], device_index(dev),
            scalar_pointer(s.lr_tensor, dev, "lr"), scalar_pointer(s.grad_scale, dev, "grad_scale"),
            scalar_pointer(s.found_inf, dev, "found_inf"), stream_of(dev))


def _rounding(table: RowTable, s: DeviceScalars) -> tuple:
    """The trailing (stochastic_rounding, rounding_seed, rounding_words) arguments
    of sgd, adam, lars and lamb: on for 16-bit params when the call has a seed
    (rows with a master are refused above; fp32/fp64 params have nothing to
    round); the seed as a host int, or the pointer of its words on the table's device."""
    on = (s.rounding_seed is not None or s.rounding_words is not None) and table.dtype in (torch.float16,
                                                                                        torch.bfloat16)
    if not on:
        return False, 0, 0
    words = s.rounding_words
    if words is None:
        return True, int(s.rounding_seed), 0
    if words.dtype is not torch.int64 or words.shape != (3,) or not words.is_contiguous() \
            or words.device != table.device:
        raise ValueError(f"rounding_seed must be a contiguous int64 tensor of shape [3] on {table.device}; "
                         f"got {shape_str(words)}")
    return True, 0, words.data_ptr()


def launch_elementwise(table: RowTable, state_dtype: torch.dtype, scalars: DeviceScalars,
                       hyper: Mapping[str, float], flags: int) -> None:
    """``_C.multi_tensor_<kernel>`` (sgd, adam) over ``table``."""
    require_cuda(table.device)
    layout = table.layout
    fn = getattr(_C, "multi_tensor_" + layout.name)
    fn(*_head(table, state_dtype, scalars), float(scalars.lr), *layout.hyper_values(hyper), int(flags),
       *_rounding(table, scalars))


def reduction_workspace(rows, device: torch.device, quantities: int, extra: int = 0):
    """(tensor, pointer) of the fp64 CUDA workspace of a reduction over ``rows``
    (an int64 row array); (None, 0) on CPU.

    Allocated per call through torch's caching allocator, so it follows the
    stream semantics of any other tensor (no host sync, no cross-stream reuse).
    """
    if device.type != "cuda":
        return None, 0
    n = int(_C.cuda_reduction_workspace_elems(rows, quantities)) + extra
    ws = torch.empty(max(n, 1), dtype=torch.float64, device=device)
    return ws, ws.data_ptr()


def launch_norm_scaled(table: RowTable, state_dtype: torch.dtype, scalars: DeviceScalars,
                       hyper: Mapping[str, float], flags: int, grad_sq: Optional[torch.Tensor] = None) -> None:
    """``_C.multi_tensor_lars`` or ``_C.multi_tensor_lamb`` over ``table``, whose
    norms column points at ``table.norms`` (``norms.attach_norm_slots``).

    grad_sq (LAMB): fp64 per-grad sums of squares of every grad the clipping norm
    covers; None: no clipping."""
    require_cuda(table.device)
    layout = table.layout
    head = _head(table, state_dtype, scalars)
    hyper_values = layout.hyper_values(hyper)
    if layout.name == "lars":
        ws, ws_ptr = reduction_workspace(table.rows, table.device, 2)
        _C.multi_tensor_lars(*head, ws_ptr, float(scalars.lr), *hyper_values, int(flags), *_rounding(table, scalars))
    elif layout.name == "lamb":
        gs_ptr, n_gs = 0, 0
        if grad_sq is not None:
            if grad_sq.dtype is not torch.float64 or grad_sq.device != table.device or not grad_sq.is_contiguous():
                raise ValueError(f"grad_sq must be a contiguous float64 tensor on {table.device}; "
                                 f"got {shape_str(grad_sq)}")
            gs_ptr, n_gs = grad_sq.data_ptr(), grad_sq.numel()
        ws, ws_ptr = reduction_workspace(table.rows, table.device, 2, extra=1)
        _C.multi_tensor_lamb(*head, ws_ptr, gs_ptr, n_gs, float(scalars.lr), *hyper_values, int(flags),
                             *_rounding(table, scalars))
    else:
        raise ValueError(f"{layout.name!r} is not a norm-scaled kernel")
    del ws  # the caching allocator keeps it alive for the stream's pending work
