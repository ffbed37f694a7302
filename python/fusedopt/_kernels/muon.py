"""Muon's kernel layer: the Newton-Schulz workspace of a row table and the two
``_C`` passes around it (csrc/ops/muon.h).

A Muon param is a matrix: ``(shape[0], numel / shape[0])``, or for a 2-D param
whose memory is transposed, the matrix its memory holds. The momentum pass
walks param, grad and buffer as flat runs in memory order, as every fusedopt
kernel does, and writes each param's update direction into its slot of a
workspace ``A[k]`` of shape ``(k, rows, cols)``: one workspace per matrix
shape of a batch, so the Newton-Schulz iteration runs batched over it. In
memory order the slot holds the matrix with its columns permuted (a
channels_last conv weight keeps each output channel's elements together but
in (h, w, c) order) or, for a transposed 2-D param, the transposed matrix.
Neither changes the result: the Frobenius norm, ``X Xᵀ`` and the iteration
commute with column permutations, and the iteration is transpose-equivariant
(Newton-Schulz of Xᵀ is the transpose of Newton-Schulz of X); the apply pass
then reads the result back in the same memory order. Layouts where dim 0 of a
param of more than 2 dims is not outermost are refused (``matrix_of``).

The workspace is made once per row table and kept with it (``workspace``):
two buffers of the matrices (the iteration ping-pongs between them, arranged so
that the result always lands in ``A``, which the rows' ``update`` column points
at), two Gram buffers, and for ``lr_ratio`` one fp64 slot per row.

Params sharded on dim 0 (FSDP2 DTensors, ``_dtensor.row_shard``) need the whole
matrix. Their rows are grouped per process group and full matrix shape
(``GatheredGroup``): the update slot of such a row is this rank's rows in a
send buffer of ``(k, chunk, cols)`` blocks (the rows beyond the rank's count stay
zero), one per process group (``RowGather``), which one all-gather per step
copies into ``recv``, every rank's send buffer in rank order; the Newton-Schulz
buffers hold the full matrices. The functional layer moves the rows between
them (functional/muon.py). The lr factors use the full shape.
"""
from __future__ import annotations

import math
import os
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import _C
from .._dtensor import RowShard, row_shard
from .layout import DTYPE_CODES, FLAGS_COLUMN, POINTER_COLUMNS, ROW_FLAGS, kernel_layout
from .checks import shape_str
from .launch import DeviceScalars, _head, require_cuda
from .norms import _sum_squares
from .rows import RowTable

MUON = kernel_layout("muon")
_ALIGNED16 = ROW_FLAGS["aligned16"]
_RATIO_SLOT_BYTES = 16  # as the norm slots: 16-byte aligned rows keep the CUDA vector path
NS_DTYPES = (torch.bfloat16, torch.float32, torch.float64)


def logical_matrix(shape: Sequence[int]) -> Tuple[int, int]:
    """(A, B): the matrix torch.optim.Muon sees, ``p.view(p.shape[0], -1)``; adjust_lr uses it."""
    a = int(shape[0])
    b = 1
    for n in shape[1:]:
        b *= int(n)
    return a, b


def matrix_of(p: torch.Tensor) -> Optional[Tuple[int, int]]:
    """(rows, cols) of the matrix p's memory holds, read in memory order; None when
    no such matrix is equivalent for Newton-Schulz (a param of more than 2 dims
    whose dim 0 is not outermost in memory)."""
    a, b = logical_matrix(p.shape)
    if p.is_contiguous() or a == 1 or b == 1:
        return a, b
    if p.dim() == 2:
        return (a, b) if p.stride(0) == b else (b, a)  # dense 2-D: row-major or its transpose
    return (a, b) if p.stride(0) == b else None


def adjust_lr_ratio(adjust_lr_fn: Optional[str], a: int, b: int) -> float:
    """torch.optim._muon._adjust_lr's factor for an (A, B) matrix (lr is multiplied by it).
    An empty matrix (B = 0, e.g. shape (4, 0)) has nothing to scale: 1 (torch's A / B
    raises ZeroDivisionError there)."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, a / b)) if b else 1.0
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(a, b))
    return 1.0


def cpu_has_bf16_matmul() -> bool:
    """Whether torch's CPU matmuls run bf16 natively here (oneDNN on a CPU with AVX512_BF16
    or AMX): then the bf16 Newton-Schulz is torch's own batched bf16 matmuls (twice the fp32
    rate on the development machine's AVX512_BF16 cores), else fp32 matmuls of bf16 values
    with rounded outputs. ``FUSEDOPT_MUON_EMULATE_BF16=1`` forces the second (tests)."""
    if os.environ.get("FUSEDOPT_MUON_EMULATE_BF16") == "1":
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class ShapeGroup:
    """The rows of a batch whose matrices have one shape, and their buffers."""

    __slots__ = ("rows", "shape", "a", "b", "gram", "gram2", "norms")

    def __init__(self, rows: List[int], shape: Tuple[int, int], dtype: torch.dtype, device: torch.device):
        k, (r, c) = len(rows), shape
        s = min(r, c)
        self.rows = rows
        self.shape = shape
        # zeros: a skipped first step (AMP found_inf) leaves the momentum pass
        # unwritten; the iteration then runs on zeros, and the apply pass skips too.
        self.a = torch.zeros((k, r, c), dtype=dtype, device=device)
        self.b = torch.empty_like(self.a)
        self.gram = torch.empty((k, s, s), dtype=dtype, device=device)
        self.gram2 = torch.empty_like(self.gram)
        self.norms: Optional[torch.Tensor] = None  # a view of the workspace's norms


class GatheredGroup(ShapeGroup):
    """Rows sharded on dim 0 over one process group whose full matrices have one shape:
    the ShapeGroup buffers hold the full matrices; ``send`` (``(k, chunk, cols)``, a
    view of the RowGather's send buffer) holds this rank's ``count`` rows of each in the
    first rows of its block; they are rows ``start:start + count`` of the full matrix."""

    __slots__ = ("chunk", "start", "count", "send", "offset")

    def __init__(self, rows: List[int], shape: Tuple[int, int], dtype: torch.dtype, device: torch.device,
                 shard: RowShard):
        super().__init__(rows, shape, dtype, device)
        self.chunk, self.start, self.count = shard.span(shape[0])
        self.send: Optional[torch.Tensor] = None
        self.offset = 0  # of its block in the send buffer, in elements


class RowGather:
    """The GatheredGroups of one process group: one all-gather of ``send`` (their blocks,
    in order) into ``recv`` (``world`` copies of it, in rank order) per step."""

    def __init__(self, shard: RowShard, members: List[GatheredGroup], dtype: torch.dtype, device: torch.device):
        self.group, self.world = shard.group, shard.world
        self.members = members
        # zeros: the rows beyond a rank's count are sent, never read
        self.send = torch.zeros(sum(len(g.rows) * g.chunk * g.shape[1] for g in members), dtype=dtype,
                                device=device)
        self.recv = torch.empty(self.world * self.send.numel(), dtype=dtype, device=device)
        offset = 0
        for g in members:
            n = len(g.rows) * g.chunk * g.shape[1]
            g.send, g.offset = self.send[offset:offset + n].view(len(g.rows), g.chunk, g.shape[1]), offset
            offset += n

    def received(self, g: GatheredGroup) -> torch.Tensor:
        """``(k, world, chunk, cols)``: rank w's block of each of g's matrices (a view of recv)."""
        k, cols = len(g.rows), g.shape[1]
        part = self.recv.view(self.world, -1)[:, g.offset:g.offset + k * g.chunk * cols]
        return part.view(self.world, k, g.chunk, cols).transpose(0, 1)


def round_bf16_(t: torch.Tensor) -> None:
    """t (a contiguous fp32 CPU buffer of a workspace) <- t rounded to bf16 values, in
    place and threaded (``_C.round_to_bf16_inplace``): the outputs of the fp32 matmuls
    that stand for bf16 ones on a CPU without bf16 matmul units."""
    if t.dtype is not torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"round_bf16_ needs a contiguous float32 CPU tensor; got {shape_str(t)}")
    _C.round_to_bf16_inplace(t.data_ptr(), t.numel())


class Workspace:
    """Everything Newton-Schulz needs for one row table (see the module docstring)."""

    def __init__(self, table: RowTable, ns_dtype: torch.dtype, sources: Optional[Sequence[torch.Tensor]] = None):
        """``sources``: the call's params of the table's rows (DTensors under FSDP2; the
        table holds their local shards); None: the table's params."""
        sources = table.params if sources is None else sources
        self.ns_dtype = ns_dtype
        device = table.device
        self.emulate_bf16 = ns_dtype is torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16_matmul()
        self.storage = torch.float32 if self.emulate_bf16 else ns_dtype
        by_shape: Dict[Tuple[int, int], List[int]] = {}
        by_shard: Dict[RowShard, Dict[Tuple[int, int], List[int]]] = {}
        for i, (p, src) in enumerate(zip(table.params, sources)):
            shard = row_shard(src)
            if shard is None:
                by_shape.setdefault(matrix_of(p), []).append(i)
            else:  # dim 0 outermost in the local shard (functional.muon.check_muon_params)
                by_shard.setdefault(shard, {}).setdefault(logical_matrix(src.shape), []).append(i)
        self.groups: List[ShapeGroup] = [ShapeGroup(rows, shape, self.storage, device)
                                         for shape, rows in by_shape.items()]
        update = np.zeros(len(table), np.int64)
        for g in self.groups:
            update[g.rows] = g.a.data_ptr() + g.a.stride(0) * g.a.element_size() * np.arange(len(g.rows))
        # in first-use order: every rank of a group builds the same gathers, in the same order
        self.gathers = [RowGather(shard, [GatheredGroup(rows, shape, self.storage, device, shard)
                                          for shape, rows in shapes.items()], self.storage, device)
                        for shard, shapes in by_shard.items()]
        for gather in self.gathers:
            for g in gather.members:
                update[g.rows] = g.send.data_ptr() + g.send.stride(0) * g.send.element_size() * np.arange(len(g.rows))
            self.groups += gather.members
        norm_dtype = torch.float64 if self.storage is torch.float64 else torch.float32
        self.norms = torch.empty((len(table),), dtype=norm_dtype, device=device)
        # the norms are of the Newton-Schulz buffers' matrices: the full ones of sharded rows
        self.norm_inputs = np.concatenate([g.a.data_ptr() + g.a.stride(0) * g.a.element_size()
                                           * np.arange(len(g.rows), dtype=np.int64) for g in self.groups])
        self.norm_numels = np.concatenate([np.full(len(g.rows), g.a[0].numel(), np.int64) for g in self.groups])
        pos = 0
        for g in self.groups:
            g.norms = self.norms[pos:pos + len(g.rows)]
            pos += len(g.rows)
        self.update_pointers = update
        self.logical = [logical_matrix(p.shape) for p in sources]  # a DTensor's shape is the full one
        self._ratios: Dict[Optional[str], torch.Tensor] = {}
        self.ratio_fn: object = ()  # the adjust_lr_fn the rows' lr_ratio column points at
        table.set_column_pointers("update", update)
        _refresh_aligned(table)

    def point_ratios(self, table: RowTable, adjust_lr_fn: Optional[str], may_create: bool = True) -> None:
        """The rows' lr_ratio column at the factors of ``adjust_lr_fn`` (made once per fn;
        ``may_create=False``: refused when they are not made yet)."""
        if self.ratio_fn == adjust_lr_fn and self.ratio_fn != ():
            return
        t = self._ratios.get(adjust_lr_fn)
        if t is None:
            if not may_create:
                raise RuntimeError(_NOT_UNDER_CAPTURE.format(what=f"the lr factors of adjust_lr_fn={adjust_lr_fn!r}"))
            per_slot = _RATIO_SLOT_BYTES // 8
            host = torch.zeros((len(table), per_slot), dtype=torch.float64)
            host[:, 0] = torch.tensor([adjust_lr_ratio(adjust_lr_fn, a, b) for a, b in self.logical],
                                      dtype=torch.float64)
            t = self._ratios[adjust_lr_fn] = host.to(table.device)
        table.set_column_pointers("lr_ratio", t.data_ptr() + _RATIO_SLOT_BYTES * np.arange(len(table), dtype=np.int64))
        self.ratio_fn = adjust_lr_fn
        _refresh_aligned(table)


def _refresh_aligned(table: RowTable) -> None:
    aligned = (table.rows[:, :POINTER_COLUMNS] % 16 == 0).all(axis=1)
    flags = table.rows[:, FLAGS_COLUMN]
    table.rows[:, FLAGS_COLUMN] = np.where(aligned, flags | _ALIGNED16, flags & ~_ALIGNED16)


# A workspace lives as long as its row table: a rebuilt plan (new tables) or another
# ns_dtype drops it. A step captured into a CUDA graph keeps using the workspace it was
# captured with, so the functional layer keeps those alive with the plan
# (StepPlan.keep_alive), as it does LARS/LAMB's norm slots.
_WORKSPACES: "weakref.WeakKeyDictionary[RowTable, Workspace]" = weakref.WeakKeyDictionary()

_NOT_UNDER_CAPTURE = ("fusedopt.Muon: {what} cannot be made inside CUDA graph capture (its zero fill and "
                      "host-to-device copy would be captured): run an eager step with the same params, grads, "
                      "ns_dtype and adjust_lr_fn before capturing")


def workspace(table: RowTable, ns_dtype: torch.dtype, adjust_lr_fn: Optional[str],
              sources: Optional[Sequence[torch.Tensor]] = None, may_create: bool = True) -> Workspace:
    """The table's workspace (made at its first use, or when ns_dtype changed),
    its rows pointed at it and at the lr factors of ``adjust_lr_fn``. ``sources``:
    as for Workspace (the same for every call with this table: its plan's).
    ``may_create=False`` (CUDA graph capture): RuntimeError where anything new is
    needed (checked before anything is made)."""
    ws = _WORKSPACES.get(table)
    if ws is None or ws.ns_dtype is not ns_dtype:
        if not may_create:
            raise RuntimeError(_NOT_UNDER_CAPTURE.format(what=f"the Newton-Schulz workspace (ns_dtype={ns_dtype})"))
        ws = _WORKSPACES[table] = Workspace(table, ns_dtype, sources)
    ws.point_ratios(table, adjust_lr_fn, may_create)
    return ws


def _launch(fn, table: RowTable, state_dtype: torch.dtype, scalars: DeviceScalars, ws: Workspace,
            momentum: float, weight_decay: float, flags: int) -> None:
    require_cuda(table.device)
    fn(*_head(table, state_dtype, scalars), DTYPE_CODES[ws.storage], float(scalars.lr), float(momentum),
       float(weight_decay), int(flags))


def launch_momentum(table: RowTable, state_dtype: torch.dtype, scalars: DeviceScalars, ws: Workspace,
                    momentum: float, nesterov: bool) -> None:
    """buf <- lerp(buf, g, 1 - momentum); the update direction into the workspace
    (rounded to bf16 values when bf16 is emulated with fp32 storage)."""
    flags = MUON.flags(nesterov=bool(nesterov), update_bf16_values=ws.emulate_bf16)
    _launch(_C.multi_tensor_muon_momentum, table, state_dtype, scalars, ws, momentum, 0.0, flags)


def launch_apply(table: RowTable, state_dtype: torch.dtype, scalars: DeviceScalars, ws: Workspace,
                 weight_decay: float) -> None:
    """p <- p (1 - lr wd) - lr ratio O, O the workspace's Newton-Schulz result."""
    _launch(_C.multi_tensor_muon_apply, table, state_dtype, scalars, ws, 0.0, weight_decay, 0)


def update_norms(ws: Workspace) -> None:
    """ws.norms = the Frobenius norm of every matrix of the Newton-Schulz buffers (the
    full matrices of sharded rows: call it after the gather; deterministic: fixed
    chunks, fixed combine order, the tensor_norms kernel)."""
    _sum_squares(ws.norm_inputs, ws.norm_numels, ws.storage, ws.norms,
                 np.arange(len(ws.norms), dtype=np.int64), take_sqrt=True)
