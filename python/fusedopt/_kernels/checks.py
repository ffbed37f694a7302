"""Checks on tensors before their pointers reach ``_C``: the core trusts them.

Messages name the offending tensor (``what``) and say what was expected.
``TypeError`` for the wrong kind (dtype, layout, sparse, complex),
``ValueError`` for the wrong value (shape, device, contiguity, aliasing).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._dtensor import is_dtensor
from .layout import DTYPE_CODES


def shape_str(t: torch.Tensor) -> str:
    return f"shape {list(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_dense(t: torch.Tensor, what: str) -> None:
    """A contiguous real tensor (the inputs of tensor_norms and the Lanczos kernels,
    which read rows of a matrix; an optimizer's params need only ``check_param``)."""
    if t.layout is not torch.strided:
        raise TypeError(f"{what} has layout {t.layout}; fusedopt needs dense (strided) tensors")
    if t.is_complex():
        raise TypeError(f"{what} is complex ({t.dtype}); fusedopt supports real floating-point tensors only")
    if not t.is_contiguous():
        raise ValueError(
            f"{what} is not contiguous (strides {list(t.stride())}, {shape_str(t)}); "
            "expected a contiguous tensor: call .contiguous()"
        )


def layout_key(t: torch.Tensor) -> Optional[tuple]:
    """None for a contiguous tensor; else its strides, 0 where a dim has size 1 (any
    stride is the same there). Tensors of one shape with equal keys keep their
    elements in the same order in memory, so an elementwise kernel may walk them
    as flat runs side by side."""
    if t.is_contiguous():
        return None
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


def is_flat_run(t: torch.Tensor) -> bool:
    """Whether t's elements fill ``numel`` consecutive elements of memory, each once
    (dense and non-overlapping: contiguous, channels_last, any permutation of
    contiguous), starting at ``data_ptr()``."""
    if t.is_contiguous():
        return True
    dims = sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def check_param(p: torch.Tensor, what: str, contiguous: bool = False) -> None:
    """A tensor a kernel updates: a supported float dtype on cpu or cuda, whose
    memory is one flat run (contiguous, channels_last or another dense,
    non-overlapping layout: the update is elementwise); ``contiguous``: only
    contiguous (tensor_norms' inputs)."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{what} is a {type(p).__name__}; expected a torch.Tensor")
    if p.dtype not in DTYPE_CODES:
        raise TypeError(f"{what} has dtype {p.dtype}; expected float32, float16, bfloat16 or float64")
    if p.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} is on {p.device}; fusedopt runs on cpu and cuda devices")
    if contiguous:
        check_dense(p, what)
        return
    if p.layout is not torch.strided:
        raise TypeError(f"{what} has layout {p.layout}; fusedopt needs dense (strided) tensors")
    if p.is_complex():
        raise TypeError(f"{what} is complex ({p.dtype}); fusedopt supports real floating-point tensors only")
    if not is_flat_run(p):
        raise ValueError(
            f"{what} has memory with gaps or overlaps (strides {list(p.stride())}, {shape_str(p)}); fusedopt "
            "updates a parameter's memory as one flat run, so it must be dense and non-overlapping "
            "(contiguous, channels_last, or another permutation of a contiguous tensor): call .contiguous()")


def check_like(t: torch.Tensor, p: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    """``t`` must be a dense tensor with ``p``'s shape, device and memory layout
    (strides) and the given dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} is a {type(t).__name__}; expected a tensor like its parameter")
    if t.layout is not torch.strided:
        raise TypeError(f"{what} has layout {t.layout} (sparse?); expected a dense tensor like its parameter")
    if t.dtype is not dtype:
        raise TypeError(f"{what} has dtype {t.dtype}; expected {dtype}")
    if t.device != p.device:
        raise ValueError(f"{what} is on {t.device}; expected {p.device}, the device of its parameter")
    if t.shape != p.shape:
        raise ValueError(f"{what} has shape {list(t.shape)}; expected {list(p.shape)}, the shape of its parameter")
    if layout_key(t) != layout_key(p):
        if p.is_contiguous():
            raise ValueError(f"{what} is not contiguous (strides {list(t.stride())}); expected a contiguous "
                             "tensor, like its parameter")
        raise ValueError(f"{what} has strides {list(t.stride())}; expected {list(p.stride())}, the memory layout "
                         "of its parameter (torch.empty_like(param) and torch.zeros_like(param) keep it)")


def check_grad(g: torch.Tensor, p: torch.Tensor, what: str) -> None:
    if isinstance(g, torch.Tensor) and g.is_sparse:
        raise TypeError(f"{what} is sparse; fusedopt needs dense grads")
    check_like(g, p, what, p.dtype)


def check_step_tensor(t, p: torch.Tensor, what: str) -> None:
    """A per-param step counter: a one-element float32 tensor on the param's device."""
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype is not torch.float32 or t.device != p.device \
            or t.layout is not torch.strided:
        got = shape_str(t) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what} must be a one-element float32 tensor on {p.device}; got {got}")


def check_scalar_tensor(t, what: str) -> None:
    """A one-element floating-point tensor (AMP's grad_scale / found_inf, a tensor lr)."""
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point():
        got = shape_str(t) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what} must be a one-element floating-point tensor; got {got}")


def check_rounding_words(t, what: str) -> None:
    """The device form of a stochastic-rounding seed: a contiguous int64 tensor of
    three words (user seed, step, stream) that the kernel reads (README
    "Stochastic rounding"); not a DTensor (every rank rounds with its own copy)."""
    if not isinstance(t, torch.Tensor) or is_dtensor(t) or t.dtype is not torch.int64 or t.shape != (3,) \
            or not t.is_contiguous():
        got = shape_str(t) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what} must be a contiguous int64 tensor of shape [3] (seed, step, stream), e.g. "
                         f"fusedopt.functional.stochastic_rounding_state(seed, step, stream, device); got {got}")


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory of a and b (as flat runs) shares a byte."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def same_metadata(tensors: Sequence[torch.Tensor], dtype: torch.dtype, shapes: Sequence[torch.Size],
                  device: Optional[torch.device] = None, layouts: Optional[Sequence[Optional[tuple]]] = None
                  ) -> bool:
    """Whether every tensor is a dense tensor of ``dtype`` with the shape and
    memory layout (``layout_key``; None: contiguous, the default for all) given for
    it, and on ``device`` when given: the per-step check of grads and params in
    Python, at the cost of a few attribute reads per tensor. A non-tensor entry
    gives False; the explaining checks then say which and why."""
    if layouts is not None:
        try:
            if any(t.dtype is not dtype or t.layout is not torch.strided or t.shape != shape
                   or layout_key(t) != layout or (device is not None and t.device != device)
                   for t, shape, layout in zip(tensors, shapes, layouts)):
                return False
        except AttributeError:
            return False
        return len(tensors) == len(shapes)
    strided = torch.strided
    try:
        if device is None:
            for t, shape in zip(tensors, shapes):
                if t.dtype is not dtype or t.layout is not strided or t.shape != shape or not t.is_contiguous():
                    return False
        elif device.type == "cpu":
            for t, shape in zip(tensors, shapes):
                if (t.dtype is not dtype or t.layout is not strided or t.shape != shape or not t.is_contiguous()
                        or not t.is_cpu):
                    return False
        else:
            index = device.index if device.index is not None else torch.cuda.current_device()
            for t, shape in zip(tensors, shapes):
                if (t.dtype is not dtype or t.layout is not strided or t.shape != shape or not t.is_contiguous()
                        or not t.is_cuda or t.get_device() != index):
                    return False
    except AttributeError:
        return False
    return len(tensors) == len(shapes)
