"""Lanczos vector work (csrc/ops/lanczos.h), used by fusedopt.hessian.lanczos.

The basis is a 2-D contiguous tensor, one basis vector per row; results are
fp64 tensors on the basis' device, written by the kernel without a host sync.
"""
from __future__ import annotations

import torch

from .. import _C
from .checks import check_dense, overlaps, shape_str
from .layout import DTYPE_CODES
from .launch import device_index, require_cuda, stream_of

LANCZOS_DTYPES = (torch.float32, torch.float64)


def _check_lanczos(basis: torch.Tensor, rows: int, w: torch.Tensor) -> None:
    if not isinstance(basis, torch.Tensor) or basis.dim() != 2:
        raise ValueError("basis must be a 2-D tensor (one basis vector per row)")
    if basis.dtype not in LANCZOS_DTYPES:
        raise TypeError(f"basis has dtype {basis.dtype}; the Lanczos kernels support float32 and float64")
    if basis.device.type not in ("cpu", "cuda"):
        raise ValueError(f"basis is on {basis.device}; expected a cpu or cuda tensor")
    check_dense(basis, "basis")
    if not 0 <= rows <= basis.shape[0]:
        raise ValueError(f"rows must be in [0, {basis.shape[0]}] (the rows of basis); got {rows}")
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.shape[0] != basis.shape[1]:
        raise ValueError(f"w must be a 1-D tensor of {basis.shape[1]} elements (the basis row length); "
                         f"got {shape_str(w) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if w.dtype is not basis.dtype or w.device != basis.device:
        raise ValueError(f"w ({shape_str(w)}) must have the dtype and device of basis ({shape_str(basis)})")
    check_dense(w, "w")
    require_cuda(basis.device)


def _lanczos_workspace(basis: torch.Tensor, width: int) -> torch.Tensor:
    chunk = int(_C.lanczos_chunk_elements(device_index(basis.device)))
    chunks = (basis.shape[1] + chunk - 1) // chunk
    return torch.empty(max(chunks * max(width, 1), 1), dtype=torch.float64, device=basis.device)


def lanczos_dots(basis: torch.Tensor, rows: int, w: torch.Tensor) -> torch.Tensor:
    """``basis[:rows] @ w`` in fp64 accumulation, one pass over the basis, deterministic."""
    _check_lanczos(basis, rows, w)
    out = torch.empty(rows, dtype=torch.float64, device=basis.device)
    if rows == 0:
        return out
    if overlaps(w, basis):
        raise ValueError("w shares memory with basis")
    ws = _lanczos_workspace(basis, rows)
    dev = basis.device
    _C.lanczos_dots(basis.data_ptr(), int(rows), int(basis.shape[1]), w.data_ptr(), out.data_ptr(), ws.data_ptr(),
                    DTYPE_CODES[basis.dtype], device_index(dev), stream_of(dev))
    return out


def lanczos_orthogonalize(basis: torch.Tensor, rows: int, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """In place ``w -= basis[:rows].T @ h``; returns ``||w||`` after the update (fp64 1-element tensor)."""
    _check_lanczos(basis, rows, w)
    if not isinstance(h, torch.Tensor) or h.dim() != 1 or h.shape[0] != rows:
        raise ValueError(f"h must be a 1-D tensor of {rows} coefficients (one per basis row used)")
    if h.dtype is not torch.float64 or h.device != basis.device or not h.is_contiguous():
        raise ValueError(f"h must be a contiguous float64 tensor on {basis.device}; got {shape_str(h)}")
    if overlaps(w, basis) or overlaps(w, h):
        raise ValueError("w shares memory with basis or h; it is written in place")
    out = torch.empty(1, dtype=torch.float64, device=basis.device)
    ws = _lanczos_workspace(basis, 1)
    dev = basis.device
    _C.lanczos_orthogonalize(basis.data_ptr(), int(rows), int(basis.shape[1]), w.data_ptr(),
                             h.data_ptr() if rows else 0, out.data_ptr(), ws.data_ptr(),
                             DTYPE_CODES[basis.dtype], device_index(dev), stream_of(dev))
    return out


