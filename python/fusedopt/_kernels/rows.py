"""Row tables: the int64 array of one ``_C`` call, one row per parameter.

A row holds the pointers of the tensors that belong to one parameter (their
columns are named by the kernel's layout), its element count and per-row
flags. A table is built once per set of tensors and kept (in a ``StepPlan``);
each step only checks that its params are unchanged and refreshes the grad
pointers: in one C++ pass (``refresh_fast``, fast_checks.py) or, when that
says anything differs or is off, with the Python checks here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .. import _C
from .checks import check_grad, layout_key, same_metadata
from .layout import (DTYPE_CODES, FLAGS_COLUMN, NUMEL_COLUMN, POINTER_COLUMNS, ROW_FLAGS, ROW_SALT_SHIFT, ROW_WIDTH,
                     KernelLayout)

_ALIGNED16 = ROW_FLAGS["aligned16"]


class RowTable:
    """The rows of one (device, dtype) batch. ``params`` are the tensors the
    kernel updates (local shards for DTensors); ``names`` say which argument each
    row came from, for error messages. ``positions``: each param's position in
    the call (default 0, 1, ...), the salt of its stochastic rounding bits
    (csrc/ops/stochastic_round.h), so that a param's bits do not depend on how
    the call's params are batched."""

    def __init__(self, layout: KernelLayout, params: Sequence[torch.Tensor], names: Sequence[str],
                 positions: Optional[Sequence[int]] = None):
        n = len(params)
        self.layout = layout
        self.params = list(params)
        self.names = list(names)
        self.rows = np.zeros((n, ROW_WIDTH), dtype=np.int64)
        salts = np.arange(n, dtype=np.int64) if positions is None else np.asarray(positions, dtype=np.int64)
        self.rows[:, FLAGS_COLUMN] = salts << ROW_SALT_SHIFT
        self.rows[:, NUMEL_COLUMN] = [p.numel() for p in params]
        self._param_column = layout.column("param")
        self.rows[:, self._param_column] = [p.data_ptr() for p in params]
        p0 = params[0]
        self.device = p0.device
        self.dtype = p0.dtype
        self.shapes = [p.shape for p in params]
        # None for a contiguous param (nearly all), else its strides (checks.layout_key):
        # every tensor of the row must have them.
        layouts = [layout_key(p) for p in params]
        self.layouts = None if all(k is None for k in layouts) else layouts
        self.nbytes = self.rows[:, NUMEL_COLUMN] * p0.element_size()
        self.norms: Optional[torch.Tensor] = None  # per-row norm slots (norm-scaled kernels)
        # Sorted (starts, ends) of the bytes the kernel writes, and the row of each;
        # set by check_no_overlap.
        self._written = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        self._written_rows = np.zeros(0, np.int64)
        self._scanner = None  # the C++ per-step checks (enable_fast_checks)

    def __len__(self) -> int:
        return len(self.params)

    def set_column(self, name: str, tensors: Sequence[Optional[torch.Tensor]]) -> None:
        self.rows[:, self.layout.column(name)] = [0 if t is None else t.data_ptr() for t in tensors]

    def set_column_pointers(self, name: str, pointers: np.ndarray) -> None:
        self.rows[:, self.layout.column(name)] = pointers

    def set_row_flag(self, name: str, on: Sequence[bool]) -> None:
        bit = ROW_FLAGS[name]
        mask = np.asarray(on, dtype=bool)
        flags = self.rows[:, FLAGS_COLUMN]
        self.rows[:, FLAGS_COLUMN] = np.where(mask, flags | bit, flags & ~bit)

    def params_changed(self) -> bool:
        """True when a param's storage, shape, dtype or layout changed since the
        table was built (e.g. ``p.data = p.data[:5]`` keeps the pointer but not
        the size): the table must then be rebuilt and everything re-checked."""
        n = len(self.params)
        ptrs = np.fromiter(map(torch.Tensor.data_ptr, self.params), np.int64, count=n)
        if not np.array_equal(ptrs, self.rows[:, self._param_column]):
            return True
        # Same pointers imply the same device; dtype, shape (hence size) and
        # strides can still change under an unchanged pointer.
        return not same_metadata(self.params, self.dtype, self.shapes, layouts=self.layouts)

    def enable_fast_checks(self) -> None:
        """Sets up ``refresh_fast`` for later steps; after ``check_no_overlap``,
        once every tensor of the table is checked."""
        starts, ends = self._written
        cpu = self.device.type == "cpu"
        self._scanner = _C.RowScanner(self.rows, DTYPE_CODES[self.dtype], 0 if cpu else 1,
                                      -1 if cpu else self.device.index, self._param_column,
                                      self.layout.column("grad"), [tuple(s) for s in self.shapes],
                                      [()] * len(self) if self.layouts is None else
                                      [() if k is None else k for k in self.layouts],
                                      starts, ends, self.params[0].element_size())

    def refresh_fast(self, grads: Sequence[torch.Tensor]) -> bool:
        """``params_changed()`` is False and ``refresh_grads(grads)`` would pass:
        then the grad column is refreshed, in one C++ pass. False when anything
        differs, or cannot be told this way (then run those two)."""
        if self._scanner is None:
            return False
        return self._scanner.refresh(self.params, grads if isinstance(grads, list) else list(grads))

    def refresh_grads(self, grads: Sequence[torch.Tensor]) -> None:
        """Checks this step's grads against the params and points the grad column at them."""
        if not same_metadata(grads, self.dtype, self.shapes, self.device, self.layouts):
            for p, g, name in zip(self.params, grads, self.names):
                check_grad(g, p, f"grad of {name}")
        grad_column = self.layout.column("grad")
        self.rows[:, grad_column] = np.fromiter(map(torch.Tensor.data_ptr, grads), np.int64, count=len(grads))
        self._check_grads_do_not_alias(grad_column)
        aligned = (self.rows[:, :POINTER_COLUMNS] % 16 == 0).all(axis=1)
        flags = self.rows[:, FLAGS_COLUMN]
        self.rows[:, FLAGS_COLUMN] = np.where(aligned, flags | _ALIGNED16, flags & ~_ALIGNED16)

    def _check_grads_do_not_alias(self, grad_column: int) -> None:
        # A grad that shares a byte with any tensor the kernel writes (any
        # row's param or state) would be read while it changes. The written
        # ranges do not overlap each other (check_no_overlap), so sorted by
        # start their ends are sorted too: one searchsorted per step.
        starts, ends = self._written
        if starts.size == 0:
            return
        gs = self.rows[:, grad_column]
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
        self._written, self._written_rows = (s, e), o
        if not starts:
            return
        bad = np.nonzero(s[1:] < np.maximum.accumulate(e)[:-1])[0]
        if bad.size:
            i = int(o[bad[0] + 1])
            raise ValueError(
                f"{self.names[i]} shares memory with another parameter or optimizer state of the same "
                "call; fusedopt needs every parameter and state tensor to own its memory"
            )


_NONE = np.zeros(0, np.int64)


def check_tables_apart(tables: Sequence[RowTable], memo: list) -> None:
    """Several tables of one step (an optimizer's param groups, and the dtypes of one):
    no param or state of one shares a byte with a param or state of another, and no
    grad of any shares a byte with any of them. Each table checks its own tensors
    (``check_no_overlap``, the per-step grad check); this compares across them: one
    sorted merge per set of tables, and per step one searchsorted of all their grads.
    A grad aliasing another group's param would be read after, or while, that group
    writes it. ``memo``: the caller's one-slot cache (a list, empty at first) of the
    last set of tables with their merged written ranges and grad sizes: they change
    only when a plan is rebuilt, so a kept step merges nothing. The optimizer that
    owns the tables keeps it (two optimizers stepped in turn do not evict each other's)."""
    if len(tables) < 2:
        return
    cached = memo[0] if memo else None
    if cached is not None and len(cached[0]) == len(tables) and all(a is b for a, b in zip(cached[0], tables)):
        _, starts, ends, nbytes = cached
    else:
        starts = np.concatenate([t._written[0] for t in tables])
        ends = np.concatenate([t._written[1] for t in tables])
        owner = np.concatenate([np.full(len(t._written[0]), k, np.int64) for k, t in enumerate(tables)])
        rows = np.concatenate([t._written_rows for t in tables])
        order = np.argsort(starts, kind="stable")
        starts, ends, owner, rows = starts[order], ends[order], owner[order], rows[order]
        bad = np.nonzero(starts[1:] < np.maximum.accumulate(ends)[:-1])[0] if starts.size else _NONE
        if bad.size:
            k = bad[0] + 1
            raise ValueError(f"{tables[owner[k]].names[rows[k]]} shares memory with another parameter or optimizer "
                             "state of this step (of another param group or dtype); fusedopt needs every parameter "
                             "and state tensor to own its memory")
        nbytes = np.concatenate([t.nbytes for t in tables])
        memo[:] = [(tuple(tables), starts, ends, nbytes)]
    if starts.size == 0:
        return
    # as RowTable._check_grads_do_not_alias, every table's grads against every table's ranges
    gs = np.concatenate([t.rows[:, t.layout.column("grad")] for t in tables])
    k = np.searchsorted(starts, gs + nbytes, side="left") - 1
    clash = (nbytes > 0) & (k >= 0) & (ends[np.maximum(k, 0)] > gs)
    if clash.any():
        i = int(np.argmax(clash))
        for t in tables:  # the name of grad i
            if i < len(t):
                raise ValueError(f"grad of {t.names[i]} shares memory with a parameter or optimizer state "
                                 "that this step writes; give every grad its own memory")
            i -= len(t)
