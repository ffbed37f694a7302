"""The operator protocol used by :func:`eigsh`, :func:`trace` and :func:`density`.

An operator is any object with ``.shape == (n, n)``, ``.dtype``, ``.device``
and ``.matvec(x)`` mapping a 1-D tensor of n elements to a 1-D tensor of n
elements. It must be symmetric (all tools here assume it). A square
``torch.Tensor`` is accepted too and wrapped in :class:`MatrixOperator`.

Optionally ``.matmat(X)`` maps an (n, b) block of vectors (columns) to the (n, b) block of
their products, counting b products in ``num_matvecs``: :func:`trace` and :func:`density`
then take their probes' products in blocks (:func:`apply_block`); without it they loop over
``matvec``.
"""
from __future__ import annotations

import torch


class MatrixOperator:
    """A dense or sparse square matrix as an operator; counts ``num_matvecs``."""

    def __init__(self, matrix: torch.Tensor):
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"operator matrix must be square 2-D; got shape {list(matrix.shape)}")
        if not matrix.dtype.is_floating_point:
            raise TypeError(f"operator matrix must be floating point; got {matrix.dtype}")
        self.matrix = matrix
        self.shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.num_matvecs = 0

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += 1
        return self.matrix @ x

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += X.shape[1]
        return self.matrix @ X


def as_operator(op):
    """Checks ``op`` against the protocol (wrapping a square tensor); returns it."""
    if isinstance(op, torch.Tensor):
        return MatrixOperator(op)
    missing = [a for a in ("shape", "dtype", "device", "matvec") if not hasattr(op, a)]
    if missing:
        raise TypeError(f"op must be a square torch.Tensor or have .shape, .dtype, .device and .matvec; "
                        f"{type(op).__name__} lacks {', '.join(missing)}")
    shape = tuple(op.shape)
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 1:
        raise ValueError(f"op.shape must be (n, n) with n >= 1; got {shape}")
    if not callable(op.matvec):
        raise TypeError("op.matvec must be callable")
    # The Lanczos vectors live on op.device and go through the fused CPU/CUDA
    # kernels: a meta (or other) device or a non-float dtype would fail deep inside
    # with an unrelated message, so reject them here.
    if not isinstance(op.dtype, torch.dtype) or not op.dtype.is_floating_point:
        raise TypeError(f"op.dtype must be a real floating-point torch.dtype; got {op.dtype!r}")
    try:
        device = torch.device(op.device)
    except (TypeError, RuntimeError):
        raise TypeError(f"op.device must be a torch.device; got {op.device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"op.device must be a cpu or cuda device; got {device}")
    return op


def basis_dtype(dtype: torch.dtype) -> torch.dtype:
    """Vectors are kept in fp64 for fp64 operators and in fp32 otherwise."""
    return torch.float64 if dtype is torch.float64 else torch.float32


def apply(op, x: torch.Tensor, what: str = "op.matvec") -> torch.Tensor:
    """``op.matvec(x)`` checked for shape, returned as a contiguous vector of x's dtype."""
    y = op.matvec(x if op.dtype is x.dtype else x.to(op.dtype))
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{what} must return a 1-D tensor of {x.shape[0]} elements; got "
                         f"{list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    return y.to(device=x.device, dtype=x.dtype).contiguous()


def apply_block(op, X: torch.Tensor) -> torch.Tensor:
    """The products of the columns of X (n, b): one ``op.matmat(X)`` where op has it (and b > 1),
    else a loop of :func:`apply`; checked for shape, returned as a contiguous (n, b) tensor of
    X's dtype."""
    matmat = getattr(op, "matmat", None)
    if X.shape[1] == 1 or not callable(matmat):
        return torch.stack([apply(op, X[:, j]) for j in range(X.shape[1])], dim=1)
    Y = matmat(X if op.dtype is X.dtype else X.to(op.dtype))
    if not isinstance(Y, torch.Tensor) or tuple(Y.shape) != tuple(X.shape):
        raise ValueError(f"op.matmat must return a tensor of shape {list(X.shape)}; got "
                         f"{list(Y.shape) if isinstance(Y, torch.Tensor) else type(Y).__name__}")
    return Y.to(device=X.device, dtype=X.dtype).contiguous()
