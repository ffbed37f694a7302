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
        self.shapes = [p.shape for p in params]
        self.dtype = p0.dtype
        self.nbytes = self.rows[:, NUMEL_COLUMN] * p0.element_size()
        # Sorted (starts, ends) of the bytes the kernel writes; set by check_no_overlap.
        self._written = (np.zeros(0, np.int64), np.zeros(0, np.int64))

    def set_column(self, column: int, tensors: Sequence[Optional[torch.Tensor]]) -> None:
        self.rows[:, column] = [0 if t is None else t.data_ptr() for t in tensors]

    def set_flag(self, flag: int, on: Sequence[bool]) -> None:
        mask = np.asarray(on, dtype=bool)
        self.rows[:, FLAGS_COLUMN] = np.where(mask, self.rows[:, FLAGS_COLUMN] | flag, self.rows[:, FLAGS_COLUMN] & ~flag)

    def params_changed(self) -> bool:
        """True when a param's storage, shape, dtype or layout changed since the
        table was built (e.g. ``p.data = p.data[:5]`` keeps the pointer but not
        the size): the table must then be rebuilt and everything re-checked."""
        n = len(self.params)
        ptrs = np.fromiter((p.data_ptr() for p in self.params), np.int64, count=n)
        if not np.array_equal(ptrs, self.rows[:, 0]):
            return True
        # Same pointers imply the same device; dtype, shape (hence size) and
        # strides can still change under an unchanged pointer (p.data = p.data[:5]).
        dtype = self.dtype
        return any(p.dtype is not dtype or p.shape != shape or not p.is_contiguous()
                   for p, shape in zip(self.params, self.shapes))

    def refresh_grads(self, grads: Sequence[torch.Tensor]) -> None:
        if not self._grads_look_right(grads):
            check_grads(self.params, grads, self.names)  # raises, naming the grad and what was expected
        self.rows[:, 1] = np.fromiter((g.data_ptr() for g in grads), np.int64, count=len(grads))
        self._check_grads_do_not_alias()
        aligned = (self.rows[:, :8] % 16 == 0).all(axis=1)
        self.rows[:, FLAGS_COLUMN] = np.where(aligned, self.rows[:, FLAGS_COLUMN] | ROW_ALIGNED16,
                                              self.rows[:, FLAGS_COLUMN] & ~ROW_ALIGNED16)

    def _grads_look_right(self, grads: Sequence[torch.Tensor]) -> bool:
        """The per-step grad check at the cost of a few attribute reads per grad
        (this runs for every grad of every step): dtype, layout, shape,
        contiguity and device of each grad against its param's."""
        dtype, strided = self.dtype, torch.strided
        if self.device.type == "cpu":
            for g, shape in zip(grads, self.shapes):
                if (g.dtype is not dtype or g.layout is not strided or g.shape != shape or not g.is_contiguous()
                        or not g.is_cpu):
                    return False
            return True
        index = device_index(self.device)
        for g, shape in zip(grads, self.shapes):
            if (g.dtype is not dtype or g.layout is not strided or g.shape != shape or not g.is_contiguous()
                    or not g.is_cuda or g.get_device() != index):
                return False
        return True

    def _check_grads_do_not_alias(self) -> None:
        # A grad that shares a byte with any tensor the kernel writes (any
        # row's param or state) would be read while it changes. The written
        # ranges do not overlap each other (check_no_overlap), so sorted by
        # start their ends are sorted too: one searchsorted per step.
        starts, ends = self._written
        if starts.size == 0:
            return
        gs = self.rows[:, 1]
        ge = gs + self.nbytes
        k = np.searchsorted(starts, ge, side="left") - 1
        clash = (self.nbytes > 0) & (k >= 0) & (ends[np.maximum(k, 0)] > gs)
        if clash.any():
            i = int(np.argmax(clash))
            raise ValueError(f"grad of {self.names[i]} shares memory with a parameter or optimizer state "
                             "that this step writes; give every grad its own memory")

    def check_no_overlap(self, columns: Sequence[Sequence[Optional[torch.Tensor]]]) -> None:
        """No two tensors the kernel writes (params and states, given per column) share a byte."""
        starts, ends, owners = [], [], []
        for tensors in columns:
            for row, t in enumerate(tensors):
                if t is not None and t.numel() > 0:
                    starts.append(t.data_ptr())
                    ends.append(t.data_ptr() + t.numel() * t.element_size())
                    owners.append(row)
        s, e, o = np.asarray(starts, np.int64), np.asarray(ends, np.int64), np.asarray(owners, np.int64)
        order = np.argsort(s, kind="stable")
        s, e, o = s[order], e[order], o[order]
        self._written = (s, e)
        if not starts:
            return
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


# ----------------------------------------------------------------------------
# Lanczos vector work (csrc/ops/lanczos.h), used by fusedopt.hessian.lanczos.
# The basis is a 2-D contiguous tensor, one basis vector per row; results are
# fp64 tensors on the basis' device, written by the kernel without a host sync.
# ----------------------------------------------------------------------------
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
    _require_cuda(basis.device)


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
    if _overlaps(w, basis):
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
    if _overlaps(w, basis) or _overlaps(w, h):
        raise ValueError("w shares memory with basis or h; it is written in place")
    out = torch.empty(1, dtype=torch.float64, device=basis.device)
    ws = _lanczos_workspace(basis, 1)
    dev = basis.device
    _C.lanczos_orthogonalize(basis.data_ptr(), int(rows), int(basis.shape[1]), w.data_ptr(),
                             h.data_ptr() if rows else 0, out.data_ptr(), ws.data_ptr(),
                             DTYPE_CODES[basis.dtype], device_index(dev), stream_of(dev))
    return out


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()
# ---- per-tensor norms, LARS, LAMB (csrc/ops/norms.h, lars.h, lamb.h) ----------
LARS_COLUMNS = ("param", "grad", "momentum_buffer", "norms", "master")
LAMB_COLUMNS = ("param", "grad", "exp_avg", "exp_avg_sq", "step", "norms", "master")
NORMS_COLUMN = {"lars": 3, "lamb": 5}


def reduction_workspace(rows: np.ndarray, quantities: int, device: torch.device, extra: int = 0):
    """(tensor, pointer) of the fp64 CUDA workspace of a reduction; (None, 0) on CPU.

    Allocated per call through torch's caching allocator, so it follows the
    stream semantics of any other tensor (no host sync, no cross-stream reuse).
    """
    if device.type != "cuda":
        return None, 0
    n = int(_C.cuda_reduction_workspace_elems(rows, quantities)) + extra
    ws = torch.empty(max(n, 1), dtype=torch.float64, device=device)
    return ws, ws.data_ptr()


def check_norm_inputs(tensors: Sequence[torch.Tensor], what: str = "tensors") -> torch.device:
    """Every tensor dense, contiguous, float32/16/bf16/64, on one cpu/cuda device."""
    if len(tensors) == 0:
        raise ValueError(f"{what} is empty; expected at least one tensor")
    device = None
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}] is a {type(t).__name__}; expected a torch.Tensor")
        check_param(t, f"{what}[{i}]")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{what}[{i}] is on {t.device}; expected {device}, the device of {what}[0]")
    return device


NORMS_OUT_DTYPES = (torch.float32, torch.float64)


def tensor_norms_into(tensors: Sequence[torch.Tensor], out: torch.Tensor, take_sqrt: bool) -> None:
    """out[i] = ||tensors[i]|| (or its square), one _C call per dtype. Inputs checked by the caller.

    ``out`` is float32 or float64: a tensor's chunk sums are combined in fp64
    and rounded once when stored in a float32 ``out``."""
    _require_cuda(out.device)
    if out.dtype not in NORMS_OUT_DTYPES or not out.is_contiguous() or out.numel() != len(tensors):
        raise ValueError(f"out must be a contiguous float32 or float64 tensor of {len(tensors)} elements; "
                         f"got {shape_str(out)}")
    by_dtype: dict = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    base, size = out.data_ptr(), out.element_size()
    for dtype, index in by_dtype.items():
        rows = np.zeros((len(index), ROW_WIDTH), dtype=np.int64)
        rows[:, 0] = [tensors[i].data_ptr() for i in index]
        rows[:, 1] = [base + size * i for i in index]
        rows[:, NUMEL_COLUMN] = [tensors[i].numel() for i in index]
        rows[:, FLAGS_COLUMN] = np.where(rows[:, 0] % 16 == 0, ROW_ALIGNED16, 0)
        ws, ws_ptr = reduction_workspace(rows, 1, out.device)
        _C.multi_tensor_norms(rows, DTYPE_CODES[dtype], DTYPE_CODES[out.dtype], device_index(out.device),
                              stream_of(out.device), ws_ptr, bool(take_sqrt))
        del ws  # the caching allocator keeps it alive for the stream's pending work


def grad_sq_norms_into(tables: Sequence[RowTable], out: torch.Tensor) -> None:
    """out[k] = sum(g^2) (fp64) for every grad of the tables (all on out's device), in table order.

    The grads were checked by RowTable.refresh_grads in this step.
    """
    _require_cuda(out.device)
    n = sum(len(t.params) for t in tables)
    if out.dtype is not torch.float64 or not out.is_contiguous() or out.numel() != n or out.device != tables[0].device:
        raise ValueError(f"out must be a contiguous float64 tensor of {n} elements on {tables[0].device}")
    by_dtype: dict = {}
    offset = 0
    for t in tables:
        by_dtype.setdefault(t.dtype, []).append((t, offset))
        offset += len(t.params)
    base = out.data_ptr()
    for dtype, parts in by_dtype.items():
        rows = np.zeros((sum(len(t.params) for t, _ in parts), ROW_WIDTH), dtype=np.int64)
        k = 0
        for t, off in parts:
            m = len(t.params)
            rows[k:k + m, 0] = t.rows[:, 1]
            rows[k:k + m, 1] = base + 8 * (off + np.arange(m, dtype=np.int64))
            rows[k:k + m, NUMEL_COLUMN] = t.rows[:, NUMEL_COLUMN]
            k += m
        rows[:, FLAGS_COLUMN] = np.where(rows[:, 0] % 16 == 0, ROW_ALIGNED16, 0)
        ws, ws_ptr = reduction_workspace(rows, 1, out.device)
        _C.multi_tensor_norms(rows, DTYPE_CODES[dtype], DTYPE_CODES[torch.float64], device_index(out.device),
                              stream_of(out.device), ws_ptr, False)
        del ws


def set_norms_column(table: RowTable, column: int) -> None:
    """Gives every row a double[2] slot (its two fp64 norm sums) of a fresh
    per-table float64 buffer of shape (n, 2).

    Slots are 16 bytes, so every slot is 16-byte aligned: a row takes the CUDA
    vector path only when all its pointers are (refresh_grads)."""
    table.norms = torch.zeros((len(table.params), 2), dtype=torch.float64, device=table.device)
    table.rows[:, column] = table.norms.data_ptr() + 16 * np.arange(len(table.params), dtype=np.int64)


LARGE_BATCH_KERNELS = ("lars", "lamb")


def launch_large_batch(kernel: str, table: RowTable, state_dtype: torch.dtype, *, lr: float,
                       lr_tensor: Optional[torch.Tensor], hyper: Sequence[float], flags: int,
                       grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                       grad_sq: Optional[torch.Tensor] = None) -> None:
    """Calls ``_C.multi_tensor_lars`` or ``_C.multi_tensor_lamb`` over ``table``
    (whose norms column was set by ``set_norms_column``).

    hyper (csrc/ops/lars.h, lamb.h order): LARS (momentum, dampening, weight_decay,
    trust_coeff, eps); LAMB (beta1, beta2, eps, weight_decay, max_grad_norm).
    grad_sq (LAMB): float64 per-grad sums of squares of every grad the clipping
    norm covers (``grad_sq_norms_into``); None: no clipping.
    """
    if kernel not in LARGE_BATCH_KERNELS:
        raise ValueError(f"kernel must be one of {LARGE_BATCH_KERNELS}; got {kernel!r}")
    _require_cuda(table.device)
    dev = table.device
    head = (table.rows, DTYPE_CODES[table.dtype], state_dtype_code(state_dtype), device_index(dev),
            scalar_pointer(lr_tensor, dev, "lr"), scalar_pointer(grad_scale, dev, "grad_scale"),
            scalar_pointer(found_inf, dev, "found_inf"), stream_of(dev))
    if kernel == "lars":
        ws, ws_ptr = reduction_workspace(table.rows, 2, dev)
        _C.multi_tensor_lars(*head, ws_ptr, float(lr), *map(float, hyper), int(flags))
    else:
        gs_ptr, n_gs = 0, 0
        if grad_sq is not None:
            if grad_sq.dtype is not torch.float64 or grad_sq.device != dev or not grad_sq.is_contiguous():
                raise ValueError(f"grad_sq must be a contiguous float64 tensor on {dev}; got {shape_str(grad_sq)}")
            gs_ptr, n_gs = grad_sq.data_ptr(), grad_sq.numel()
        ws, ws_ptr = reduction_workspace(table.rows, 2, dev, extra=1)
        _C.multi_tensor_lamb(*head, ws_ptr, gs_ptr, n_gs, float(lr), *map(float, hyper), int(flags))
    del ws  # the caching allocator keeps it alive for the stream's pending work
