"""Per-tensor norms as functions: ``tensor_norms`` and LAMB's clipping input ``grad_sq_norms``."""
from __future__ import annotations

from typing import Sequence

import torch

from .._kernels import check_norm_inputs, tensor_norms_into


def _tensor_list(tensors, what: str) -> list:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{what} must be a list of tensors; wrap a single tensor as [t]")
    try:
        return list(tensors)
    except TypeError:  # e.g. None: say which argument, not "'NoneType' object is not iterable"
        raise TypeError(f"{what} must be a list or tuple of tensors; got {type(tensors).__name__}") from None


def tensor_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of every tensor, as one tensor on their device.

    One pass over memory (one ``_C`` call per dtype present). Accumulation is
    fp32 inside fixed-size chunks (fp64 for fp64 inputs), and the chunk sums of
    a tensor are combined in fp64 in one fixed order (csrc/ops/combine.h): no
    atomics, so the same inputs give the same bits run after run and for any CPU
    thread count. An empty tensor has norm 0. Never synchronizes with the host.

    Args:
        tensors: a non-empty list (or tuple) of dense, contiguous float32,
            float16, bfloat16 or float64 tensors, all on one cpu or cuda device.

    Returns:
        tensor of shape ``[len(tensors)]``: float64 when any input is float64
        (an fp64 norm of an fp64 tensor, as ``torch.linalg.vector_norm``
        returns), else float32. 16-bit inputs get float32 norms (accumulated in
        fp32), more precise than the float16/bfloat16 result
        ``torch.linalg.vector_norm`` returns for them.
    """
    tensors = _tensor_list(tensors, "tensors")
    device = check_norm_inputs(tensors, "tensors")
    dtype = torch.float64 if any(t.dtype is torch.float64 for t in tensors) else torch.float32
    out = torch.empty((len(tensors),), dtype=dtype, device=device)  # every entry is written
    tensor_norms_into(tensors, out, take_sqrt=True)
    return out


def grad_sq_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum(g^2) of every grad (one device), float64 ``[len(grads)]``: LAMB's
    clipping input, the same bits as a LAMB step's own per-grad sums."""
    grads = _tensor_list(grads, "grads")
    device = check_norm_inputs(grads, "grads")
    out = torch.empty((len(grads),), dtype=torch.float64, device=device)
    tensor_norms_into(grads, out, take_sqrt=False)
    return out
