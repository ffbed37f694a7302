"""The one module that turns tensors into raw pointers for ``fusedopt._C``.

The compiled core trusts what it is given, so everything is checked here first:
devices, dtypes, shapes, layouts and aliasing. Nothing in this module writes to
a tensor; the kernels it calls are the only writers, and they run only after
every check of the call has passed.

A call's tensors are passed as an int64 array of rows, one row per parameter:
eight pointer columns (their meaning is per kernel, see csrc/ops/*.h), the
element count and per-row flags.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from . import _C

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
ROW_WIDTH = 10
NUMEL_COLUMN, FLAGS_COLUMN = 8, 9
ROW_FIRST_STEP = 1
ROW_ALIGNED16 = 2

# Column layouts, mirroring csrc/ops/sgd.h and csrc/ops/adam.h.
SGD_COLUMNS = ("param", "grad", "momentum_buffer", "master")
ADAM_COLUMNS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step", "master")


def shape_str(t: torch.Tensor) -> str:
    return f"shape {list(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_dense(t: torch.Tensor, what: str) -> None:
    """A kernel may treat ``t`` as a flat run of numel elements."""
    if t.layout is not torch.strided:
        raise TypeError(f"{what} has layout {t.layout}; fusedopt needs dense (strided) tensors")
    if t.is_complex():
        raise TypeError(f"{what} is complex ({t.dtype}); fusedopt supports real floating-point tensors only")
    if not t.is_contiguous():
        raise ValueError(
            f"{what} is not contiguous (strides {list(t.stride())}, {shape_str(t)}); "
            "fusedopt updates memory as one flat run: call .contiguous() on the parameter "
            "(for channels_last models keep the parameters contiguous)"
        )


def check_param(p: torch.Tensor, what: str) -> None:
    if p.dtype not in DTYPE_CODES:
        raise TypeError(f"{what} has dtype {p.dtype}; expected float32, float16, bfloat16 or float64")
    if p.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} is on {p.device}; fusedopt runs on cpu and cuda devices")
    if p.device.type == "cuda" and p.dtype is torch.float64:
        pass  # fp64 on CUDA is supported; listed here so the rule is visible
    check_dense(p, what)


def check_like(t: torch.Tensor, p: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    """``t`` must be a dense tensor with ``p``'s shape and device and the given dtype."""
    if t.layout is not torch.strided:
        raise TypeError(f"{what} has layout {t.layout} (sparse?); expected a dense tensor like its parameter")
    if t.dtype is not dtype:
        raise TypeError(f"{what} has dtype {t.dtype}; expected {dtype}")
    if t.device != p.device:
        raise ValueError(f"{what} is on {t.device}; expected {p.device}, the device of its parameter")
    if t.shape != p.shape:
        raise ValueError(f"{what} has shape {list(t.shape)}; expected {list(p.shape)}, the shape of its parameter")
    if not t.is_contiguous():
        raise ValueError(f"{what} is not contiguous (strides {list(t.stride())}); expected a contiguous tensor")


def check_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """Per-step check of the grads: the fast test first, the explaining one on failure."""
    for p, g, name in zip(params, grads, names):
        if (
            g.dtype is not p.dtype
            or g.layout is not torch.strided
            or g.shape != p.shape
            or g.device != p.device
            or not g.is_contiguous()
        ):
            if g.is_sparse:
                raise TypeError(f"grad of {name} is sparse; fusedopt needs dense grads")
            check_like(g, p, f"grad of {name}", p.dtype)


def state_dtype_code(dtype: torch.dtype) -> int:
    if dtype not in DTYPE_CODES:
        raise TypeError(f"state dtype {dtype} is not supported")
    return DTYPE_CODES[dtype]


class RowTable:
    """The rows of one (device, dtype) batch of a param group.

    Pointer columns of the state tensors are filled by ``set_column`` when the
    batch is (re)built; params and grads are refreshed every step by
    ``refresh``, which also notices when a parameter's storage moved.
    """

    def __init__(self, params: Sequence[torch.Tensor], names: Sequence[str]):
        n = len(params)
        self.params = list(params)
        self.names = list(names)
        self.rows = np.zeros((n, ROW_WIDTH), dtype=np.int64)
        self.rows[:, NUMEL_COLUMN] = [p.numel() for p in params]
        self.rows[:, 0] = [p.data_ptr() for p in params]
        p0 = params[0]
        self.device = p0.device
        self.dtype = p0.dtype
        self.nbytes = self.rows[:, NUMEL_COLUMN] * p0.element_size()

    def set_column(self, column: int, tensors: Sequence[Optional[torch.Tensor]]) -> None:
        self.rows[:, column] = [0 if t is None else t.data_ptr() for t in tensors]

    def set_flag(self, flag: int, on: Sequence[bool]) -> None:
        mask = np.asarray(on, dtype=bool)
        self.rows[:, FLAGS_COLUMN] = np.where(mask, self.rows[:, FLAGS_COLUMN] | flag, self.rows[:, FLAGS_COLUMN] & ~flag)

    def params_moved(self) -> bool:
        ptrs = np.fromiter((p.data_ptr() for p in self.params), np.int64, count=len(self.params))
        return not np.array_equal(ptrs, self.rows[:, 0])

    def refresh_grads(self, grads: Sequence[torch.Tensor]) -> None:
        check_grads(self.params, grads, self.names)
        self.rows[:, 1] = np.fromiter((g.data_ptr() for g in grads), np.int64, count=len(grads))
        self._check_grads_do_not_alias()
        aligned = (self.rows[:, :8] % 16 == 0).all(axis=1)
        self.rows[:, FLAGS_COLUMN] = np.where(aligned, self.rows[:, FLAGS_COLUMN] | ROW_ALIGNED16,
                                              self.rows[:, FLAGS_COLUMN] & ~ROW_ALIGNED16)

    def _check_grads_do_not_alias(self) -> None:
        # A grad that shares memory with a tensor the kernel writes would be
        # read while it changes. Compared per row (cheap, every step); other
        # rows' memory is covered by check_no_overlap when the table is built.
        g = self.rows[:, 1:2]
        written = np.concatenate([self.rows[:, :1], self.rows[:, 2:8]], axis=1)
        clash = ((written != 0) & (written == g)).any(axis=1)
        if clash.any():
            i = int(np.argmax(clash))
            raise ValueError(f"grad of {self.names[i]} shares memory with its parameter or optimizer state")

    def check_no_overlap(self, columns: Sequence[Sequence[Optional[torch.Tensor]]]) -> None:
        """No two tensors the kernel writes (params and states, given per column) share a byte."""
        starts, ends, owners = [], [], []
        for tensors in columns:
            for row, t in enumerate(tensors):
                if t is not None and t.numel() > 0:
                    starts.append(t.data_ptr())
                    ends.append(t.data_ptr() + t.numel() * t.element_size())
                    owners.append(row)
        if not starts:
            return
        s, e, o = np.asarray(starts, np.int64), np.asarray(ends, np.int64), np.asarray(owners)
        order = np.argsort(s, kind="stable")
        s, e, o = s[order], e[order], o[order]
        bad = np.nonzero(s[1:] < np.maximum.accumulate(e)[:-1])[0]
        if bad.size:
            i = int(o[bad[0] + 1])
            raise ValueError(
                f"{self.names[i]} shares memory with another parameter or optimizer state of the same "
                "call; fusedopt needs every parameter and state tensor to own its memory"
            )


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


def _require_cuda(device: torch.device) -> None:
    if device.type == "cuda" and not _C.cuda_compiled():
        raise RuntimeError("this fusedopt build has no CUDA kernels; reinstall with nvcc available (FUSEDOPT_CUDA=on)")


def launch(kernel: str, table: RowTable, state_dtype: torch.dtype, *, lr: float, lr_tensor: Optional[torch.Tensor],
           hyper: Sequence[float], flags: int, grad_scale: Optional[torch.Tensor],
           found_inf: Optional[torch.Tensor]) -> None:
    """Calls ``_C.multi_tensor_<kernel>`` over ``table``.

    Every optimizer entry point of ``_C`` takes the same leading arguments
    (rows, dtype codes, device, scalar pointers, stream, lr) followed by its own
    hyperparameters (csrc/ops/<kernel>.h) and an int of option flags.
    """
    _require_cuda(table.device)
    dev = table.device
    fn = getattr(_C, "multi_tensor_" + kernel)
    fn(table.rows, DTYPE_CODES[table.dtype], state_dtype_code(state_dtype), device_index(dev),
       scalar_pointer(lr_tensor, dev, "lr"), scalar_pointer(grad_scale, dev, "grad_scale"),
       scalar_pointer(found_inf, dev, "found_inf"), stream_of(dev), float(lr), *map(float, hyper), int(flags))
