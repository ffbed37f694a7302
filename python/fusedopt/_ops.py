"""``fusedopt::fused_step`` (SGD, Adam, AdamW) and ``fusedopt::large_batch_step``
(+ ``fusedopt::grad_sq_norms``, LARS and LAMB): the optimizer kernels as
torch.library custom ops.

torch.compile cannot trace into ``_C`` (raw pointers), so the compiled step
(``FusedOptimizer._compiled_step``) calls this op instead: dynamo and
AOTAutograd see one opaque call that mutates the params and states in place
(declared in ``mutates_args``), and the fake implementation tells them it
returns nothing. The eager step never comes here: it keeps its cached row
tables, so the op adds no per-tensor cost outside compiled code.

``states`` is the flat, column-major list of the state tensors: for each kernel
column in ``columns``, one tensor per param. ``kinds`` says what each column
holds (``column_kind``): a state like the param in ``state_dtype``, the fp32
step counter, or the fp32 master copy.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import _kernels

_STATE, _STEP, _MASTER = 0, 1, 2
_DTYPE_OF_CODE = {code: dtype for dtype, code in _kernels.DTYPE_CODES.items()}


def column_kind(key: str) -> int:
    return _STEP if key == "step" else _MASTER if key == "master" else _STATE


def _checked_table(params, grads, states, columns, kinds, state_dtype):
    """The RowTable of one op call, after every check (None for no params)."""
    n = len(params)
    if n == 0:
        return None
    if len(grads) != n or len(states) != n * len(columns) or len(kinds) != len(columns):
        raise ValueError(f"fusedopt::fused_step: {n} params need {n} grads and {n} x {len(columns)} states; "
                         f"got {len(grads)} grads, {len(states)} states, {len(kinds)} kinds")
    if state_dtype not in _DTYPE_OF_CODE:
        raise ValueError(f"state_dtype code {state_dtype} is not one of {sorted(_DTYPE_OF_CODE)}")
    sdtype = _DTYPE_OF_CODE[state_dtype]
    names = [f"params[{i}]" for i in range(n)]
    p0 = params[0]
    for p, name in zip(params, names):
        _kernels.check_param(p, name)
        if p.device != p0.device or p.dtype is not p0.dtype:
            raise ValueError(f"{name} is {p.dtype} on {p.device}; one call needs one device and dtype "
                             f"({p0.dtype} on {p0.device})")
    table = _kernels.RowTable(params, names)
    written = [params]
    for c, (column, kind) in enumerate(zip(columns, kinds)):
        col = states[c * n:(c + 1) * n]
        for p, t, name in zip(params, col, names):
            if kind == _STEP:
                if t.numel() != 1 or t.dtype is not torch.float32 or t.device != p.device:
                    raise ValueError(f"step of {name} must be a one-element float32 tensor on {p.device}")
            else:
                _kernels.check_like(t, p, f"state column {column} of {name}",
                                    torch.float32 if kind == _MASTER else sdtype)
        table.set_column(column, col)
        if kind != _STEP:
            written.append(col)
    table.check_no_overlap(written)
    table.refresh_grads(grads)
    return table


def _scalars(dev, lr, lr_tensor, grad_scale, found_inf):
    """(lr, device lr tensor or None, grad_scale, found_inf) as the launchers take them."""
    lr_value, lr_dev = float(lr), None
    if lr_tensor is not None:
        if lr_tensor.device.type == "cpu":
            lr_value = float(lr_tensor)
        else:
            lr_dev = lr_tensor.to(device=dev, dtype=torch.float32).reshape(())
    amp = [None if t is None else t.to(device=dev, dtype=torch.float32).reshape(()) for t in (grad_scale, found_inf)]
    return lr_value, lr_dev, amp[0], amp[1]


@torch.library.custom_op("fusedopt::fused_step", mutates_args=("params", "states"))
def fused_step(kernel: str, params: List[torch.Tensor], grads: List[torch.Tensor], states: List[torch.Tensor],
               columns: List[int], kinds: List[int], state_dtype: int, lr: float, lr_tensor: Optional[torch.Tensor],
               hyper: List[float], flags: int, grad_scale: Optional[torch.Tensor],
               found_inf: Optional[torch.Tensor]) -> None:
    table = _checked_table(params, grads, states, columns, kinds, state_dtype)
    if table is None:
        return
    lr_value, lr_dev, gs, fi = _scalars(table.device, lr, lr_tensor, grad_scale, found_inf)
    _kernels.launch(kernel, table, _DTYPE_OF_CODE[state_dtype], lr=lr_value, lr_tensor=lr_dev, hyper=hyper,
                    flags=flags, grad_scale=gs, found_inf=fi)


@fused_step.register_fake
def _(kernel, params, grads, states, columns, kinds, state_dtype, lr, lr_tensor, hyper, flags, grad_scale,
      found_inf) -> None:
    return None


# ---- LARS and LAMB ---------------------------------------------------------
@torch.library.custom_op("fusedopt::large_batch_step", mutates_args=("params", "states"))
def large_batch_step(kernel: str, params: List[torch.Tensor], grads: List[torch.Tensor], states: List[torch.Tensor],
                     columns: List[int], kinds: List[int], state_dtype: int, lr: float,
                     lr_tensor: Optional[torch.Tensor], hyper: List[float], flags: int,
                     grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                     grad_sq: Optional[torch.Tensor]) -> None:
    """A LARS or LAMB step as one op: the arguments of ``fused_step`` plus LAMB's
    per-grad sums of squares for clipping (``grad_sq_norms``; None: no clipping).
    The norm workspace column is allocated here. Plain (non-DTensor) params only:
    sharded params need all-reduces between passes and take the eager step."""
    if kernel not in _kernels.LARGE_BATCH_KERNELS:
        raise ValueError(f"fusedopt::large_batch_step: kernel must be one of {_kernels.LARGE_BATCH_KERNELS}; "
                         f"got {kernel!r}")
    table = _checked_table(params, grads, states, columns, kinds, state_dtype)
    if table is None:
        return
    _kernels.set_norms_column(table, _kernels.NORMS_COLUMN[kernel])
    lr_value, lr_dev, gs, fi = _scalars(table.device, lr, lr_tensor, grad_scale, found_inf)
    _kernels.launch_large_batch(kernel, table, _DTYPE_OF_CODE[state_dtype], lr=lr_value, lr_tensor=lr_dev,
                                hyper=hyper, flags=flags, grad_scale=gs, found_inf=fi, grad_sq=grad_sq)


@large_batch_step.register_fake
def _(kernel, params, grads, states, columns, kinds, state_dtype, lr, lr_tensor, hyper, flags, grad_scale,
      found_inf, grad_sq) -> None:
    return None


@torch.library.custom_op("fusedopt::grad_sq_norms", mutates_args=())
def grad_sq_norms(grads: List[torch.Tensor]) -> torch.Tensor:
    """sum(g^2) of every grad (one device), float64 ``[len(grads)]``: LAMB's clipping
    input. Same rows, so the same bits, as the eager step's per-grad sums."""
    device = _kernels.check_norm_inputs(grads, "grads")
    out = torch.empty((len(grads),), dtype=torch.float64, device=device)
    _kernels.tensor_norms_into(grads, out, take_sqrt=False)
    return out


@grad_sq_norms.register_fake
def _(grads):
    return grads[0].new_empty((len(grads),), dtype=torch.float64)
