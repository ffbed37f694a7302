"""Per-tensor sums of squares (``_C.multi_tensor_norms``) and the per-row norm
slots of the norm-scaled kernels (LARS, LAMB). Deterministic: fixed chunks,
partials added in a fixed order (csrc/ops/norms.h)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .. import _C
from .checks import check_param, shape_str
from .layout import DTYPE_CODES, FLAGS_COLUMN, NUMEL_COLUMN, ROW_FLAGS, ROW_WIDTH, kernel_layout
from .launch import device_index, reduction_workspace, require_cuda, stream_of
from .rows import RowTable

_NORMS = kernel_layout("norms")
_ALIGNED16 = ROW_FLAGS["aligned16"]
# Bytes between the norm slots of consecutive rows. A row takes the CUDA
# vector path only when all its pointers are 16-byte aligned, so narrower
# slots would send every other row to the scalar path.
NORM_SLOT_BYTES = 16


def check_norm_inputs(tensors: Sequence[torch.Tensor], what: str = "tensors") -> torch.device:
    """Every tensor dense, contiguous, float32/16/bf16/64, on one cpu/cuda device."""
    if len(tensors) == 0:
        raise ValueError(f"{what} is empty; expected at least one tensor")
    device = None
    for i, t in enumerate(tensors):
        check_param(t, f"{what}[{i}]", contiguous=True)
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{what}[{i}] is on {t.device}; expected {device}, the device of {what}[0]")
    return device


def _sum_squares(inputs: np.ndarray, numels: np.ndarray, dtype: torch.dtype, out: torch.Tensor,
                 index: np.ndarray, take_sqrt: bool) -> None:
    """out[index[k]] = sum of squares (or norm) of the tensor at inputs[k]."""
    rows = np.zeros((len(inputs), ROW_WIDTH), dtype=np.int64)
    rows[:, _NORMS.column("input")] = inputs
    rows[:, _NORMS.column("out")] = out.data_ptr() + out.element_size() * index
    rows[:, NUMEL_COLUMN] = numels
    rows[:, FLAGS_COLUMN] = np.where(inputs % 16 == 0, _ALIGNED16, 0)
    ws, ws_ptr = reduction_workspace(rows, out.device, 1)
    _C.multi_tensor_norms(rows, DTYPE_CODES[dtype], DTYPE_CODES[out.dtype], device_index(out.device),
                          stream_of(out.device), ws_ptr, bool(take_sqrt))
    del ws  # the caching allocator keeps it alive for the stream's pending work


def _check_out(out: torch.Tensor, n: int, device: torch.device, dtypes=(torch.float32, torch.float64)) -> None:
    require_cuda(device)
    if out.dtype not in dtypes or not out.is_contiguous() or out.numel() != n or out.device != device:
        kinds = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"out must be a contiguous {kinds} tensor of {n} elements on {device}; got {shape_str(out)}")


def tensor_norms_into(tensors: Sequence[torch.Tensor], out: torch.Tensor, take_sqrt: bool) -> None:
    """out[i] = ||tensors[i]|| (or its square), one _C call per dtype. Inputs checked by the caller."""
    _check_out(out, len(tensors), out.device)
    by_dtype: dict = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, index in by_dtype.items():
        idx = np.asarray(index, dtype=np.int64)
        _sum_squares(np.asarray([tensors[i].data_ptr() for i in index], np.int64),
                     np.asarray([tensors[i].numel() for i in index], np.int64), dtype, out, idx, take_sqrt)


def grad_sq_norms_into(tables: Sequence[RowTable], out: torch.Tensor) -> None:
    """out[k] = sum(g^2) in fp64 for every grad of the tables (all on out's device),
    in table order. The grads were checked by RowTable.refresh_grads in this step."""
    n = sum(len(t) for t in tables)
    _check_out(out, n, tables[0].device, (torch.float64,))
    offset = 0
    by_dtype: dict = {}
    for t in tables:
        by_dtype.setdefault(t.dtype, []).append((t, offset))
        offset += len(t)
    for dtype, parts in by_dtype.items():
        grad_ptrs = np.concatenate([t.rows[:, t.layout.column("grad")] for t, _ in parts])
        numels = np.concatenate([t.rows[:, NUMEL_COLUMN] for t, _ in parts])
        idx = np.concatenate([off + np.arange(len(t), dtype=np.int64) for t, off in parts])
        _sum_squares(grad_ptrs, numels, dtype, out, idx, take_sqrt=False)


def attach_norm_slots(table: RowTable) -> None:
    """Gives every row of a norm-scaled table its own slot of a fresh buffer
    (``table.norms``, fp64 ``[n, 2]``), where the kernel leaves that row's two sums
    (csrc/ops/lars.h, lamb.h): fp64, so fp64 params get fp64-exact trust ratios."""
    n = len(table)
    table.norms = torch.zeros((n, NORM_SLOT_BYTES // 8), dtype=torch.float64, device=table.device)
    table.set_column_pointers("norms", table.norms.data_ptr() + NORM_SLOT_BYTES * np.arange(n, dtype=np.int64))
