"""Step plans: everything a functional call checked and built, kept for the
next call with the same tensors.

A functional entry describes its tensors as columns (the kernel column each
list fills, and what kind of tensor it holds). ``prepare`` checks them all
and builds one ``RowTable`` per (device, dtype) batch, or, when the caller
hands back a ``StepPlan`` that was built from the same tensor objects and
no param's storage changed, only re-checks this step's grads. Nothing here
writes a tensor the caller gave; zero state created for ``None`` entries (the
momentum buffers of a first SGD step) is handed to the caller only after the
kernels ran (``StepPlan.commit_created``).
"""
from __future__ import annotations

from operator import is_
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .._dtensor import is_dtensor, local_tensor, shard_groups
from . import fast_checks
from .checks import check_like, check_param, check_step_tensor
from .layout import KernelLayout
from .norms import attach_norm_slots
from .quant8 import check_absmax, new_absmax
from .rows import RowTable

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
STATE, STEP, MASTER = "state", "step", "master"
# A counter that belongs with the state a call creates (SGD/LARS momentum buffer
# ages, csrc/ops/sgd.h momentum_first_step): made, zero, wherever the create
# column's entry is made; None elsewhere (no counter: the row's flag decides).
AGE = "age"
# The block scales of a param's 8-bit states (quant8.py): float32 [k, blocks],
# k the call's STATE columns; made, zero, wherever the create column's entry is.
ABSMAX = "absmax"
_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.int8)


class Column(NamedTuple):
    """One list argument of a functional call: the kernel column it fills, the
    argument's name (for messages), what it holds and its tensors (one per param)."""
    name: str
    arg: str
    kind: str  # STATE (like the param, in the state dtype), STEP (fp32 counter), AGE, ABSMAX or MASTER (fp32 copy)
    tensors: Sequence[Optional[torch.Tensor]]


class Labels:
    """How messages name the tensors of a call: ``params[3]``, ``exp_avgs[3]`` for
    the functional API; ``param_groups[0]['params'][3]`` and ``state['exp_avg'] of
    ...`` when an optimizer passes the names of its params."""

    def __init__(self, names: Optional[Sequence[str]] = None):
        self.names = names

    def param(self, i: int) -> str:
        return self.names[i] if self.names is not None else f"params[{i}]"

    def column(self, col: Column, i: int) -> str:
        if self.names is not None:
            return f"state['{col.name}'] of {self.names[i]}"
        return f"{col.arg}[{i}]"


class Batch:
    """The rows of one (device, dtype) of a call and what launching them needs."""

    __slots__ = ("index", "table", "state_dtype", "sources", "sharded")

    def __init__(self, index: List[int], table: RowTable, state_dtype: torch.dtype, sources: List[torch.Tensor]):
        self.index = index
        self.table = table
        self.state_dtype = state_dtype
        self.sources = sources  # the call's params (DTensors under FSDP2); table.params are their locals
        # Per-tensor sums over local shards must be all-reduced when a source is sharded.
        self.sharded = any(shard_groups(p) for p in sources)


class StepPlan:
    """A cache owned by the caller of a functional entry (``plan=``): pass the same
    object every step and the checks and row tables of the last call are reused
    while the params and states are the same tensor objects.

    ``owned_lists=True`` is a promise that the caller never changes a list it
    passed in place (it passes a new list object instead, as the optimizer
    classes do): a call with the very same list objects then skips comparing
    their tensors one by one. Params' storage and this step's grads are
    checked on every call either way."""

    def __init__(self, owned_lists: bool = False) -> None:
        self.owned_lists = owned_lists
        # Set when a call was prepared during CUDA graph capture: a graph may then
        # write the norm slots of these tables on every replay, so a rebuild keeps
        # the old buffers alive (``retired``, for the plan's lifetime) instead of
        # freeing memory a graph still writes. ``keep_alive`` adds other such
        # buffers (Muon's Newton-Schulz workspaces), at the capture that used them.
        self.captured = False
        self.retired: List[object] = []
        self._sources: Optional[tuple] = None  # the list objects the plan was built from
        self.layout: Optional[KernelLayout] = None
        self.key: Tuple[str, ...] = ()
        self.params: List[torch.Tensor] = []
        self.columns: List[List[Optional[torch.Tensor]]] = []
        self.batches: List[Batch] = []
        self.has_dtensor = False
        # (column index, position, tensor) of zero state made for None entries.
        self.created: List[Tuple[int, int, torch.Tensor]] = []

    def _same_tensors(self, layout: KernelLayout, params: Sequence, columns: Sequence[Column]) -> bool:
        """Whether the call passes the tensor objects the plan was built from (their
        storage and this step's grads are checked by ``_refresh``)."""
        if self.layout is not layout or self.key != tuple(c.name for c in columns) or self.created:
            return False
        same_lists = (self.owned_lists and self._sources is not None and self._sources[0] is params
                      and all(map(is_, (c.tensors for c in columns), self._sources[1])))
        if not same_lists:
            if len(params) != len(self.params) or not all(map(is_, params, self.params)):
                return False
            for col, kept in zip(columns, self.columns):
                if len(col.tensors) != len(kept) or not all(map(is_, col.tensors, kept)):
                    return False
            self._sources = (params, tuple(c.tensors for c in columns))  # new lists, same tensors
        if self.has_dtensor:  # the shards the rows point at must still be theirs
            for b in self.batches:
                if any(local_tensor(params[i]) is not t for i, t in zip(b.index, b.table.params)):
                    return False
        return True

    def keep_alive(self, buffers: Sequence[object]) -> None:
        """Keeps ``buffers`` (used by a step being captured) for the plan's lifetime:
        a rebuild of the cache that made them must not free memory a graph replays."""
        for b in buffers:
            if not any(r is b for r in self.retired):
                self.retired.append(b)

    def commit_created(self, columns: Sequence[Column]) -> List[int]:
        """After the kernels ran: zero state made for None entries goes into the
        caller's lists (as torch's functional SGD fills momentum_buffer_list), and
        the plan stays valid for the next call that passes those tensors.
        Returns the positions that got new state."""
        positions = sorted({i for _, i, _ in self.created})
        for c, i, t in self.created:
            lst = columns[c].tensors
            if isinstance(lst, list):
                lst[i] = t
            self.columns[c][i] = t
        if self.created:
            for b in self.batches:
                b.table.set_row_flag("first_step", [False] * len(b.table))
        self.created = []
        return positions


def _batch_grads(plan: StepPlan, b: Batch, grads: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    if len(plan.batches) == 1 and not plan.has_dtensor:
        return grads
    gs = [grads[i] for i in b.index]
    return [local_tensor(g) for g in gs] if plan.has_dtensor else gs


def _refresh(plan: StepPlan, grads: Sequence[torch.Tensor]) -> bool:
    """Checks that no param of a plan of the same tensors changed and this step's
    grads fit, and points the rows at the grads. False: a param changed (re-plan).
    Raises on a bad grad, before anything is written."""
    if all(b.table.refresh_fast(_batch_grads(plan, b, grads)) for b in plan.batches):
        return True  # one C++ pass per batch; anything unusual goes on to the Python checks
    if any(b.table.params_changed() for b in plan.batches):
        return False
    for b in plan.batches:
        b.table.refresh_grads(_batch_grads(plan, b, grads))
    return True


def prepare(layout: KernelLayout, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
            columns: Sequence[Column], *, labels: Labels, state_dtype: Optional[torch.dtype] = None,
            create: Optional[str] = None, plan: Optional[StepPlan] = None) -> StepPlan:
    """Checks a call and returns its plan (``plan`` itself, reused or rebuilt).

    ``create``: the STATE column whose None entries get fresh zero tensors in the
    batch's state dtype (their rows are first-step rows). ``state_dtype``: the
    dtype states must have (None: that of the batch's first state tensor)."""
    n = len(params)
    if len(grads) != n:
        raise ValueError(f"grads has {len(grads)} entries; expected {n}, one per param")
    for col in columns:
        if len(col.tensors) != n:
            raise ValueError(f"{col.arg} has {len(col.tensors)} entries; expected {n}, one per param")
    plan = StepPlan() if plan is None else plan
    if plan._same_tensors(layout, params, columns) and _refresh(plan, grads):
        return plan
    built = _build(layout, params, grads, columns, labels, state_dtype, create)
    if plan.captured:
        plan.retired += [b.table.norms for b in plan.batches if b.table.norms is not None]
    plan.layout, plan.key = layout, tuple(c.name for c in columns)
    plan.params = list(params)
    plan.columns = [list(c.tensors) for c in columns]
    plan._sources = (params, tuple(c.tensors for c in columns))
    plan.batches, plan.created = built
    plan.has_dtensor = any(map(is_dtensor, params))
    return plan


def _build(layout, params, grads, columns, labels, state_dtype, create):
    by_key: Dict[tuple, List[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        if is_dtensor(p) != is_dtensor(g):
            raise TypeError(f"{labels.param(i)} and its grad must both be DTensors or both plain tensors")
        lp = local_tensor(p)
        check_param(lp, labels.param(i))
        by_key.setdefault((lp.device, lp.dtype), []).append(i)
    batches, created = [], []
    n_quant = sum(col.kind == STATE for col in columns)
    for index in by_key.values():
        local = [local_tensor(params[i]) for i in index]
        sdtype = _batch_state_dtype(local[0], index, columns, labels, state_dtype)
        _check_quantized_batch(params, index, columns, labels, sdtype)
        table = RowTable(layout, local, [labels.param(i) for i in index], positions=index)
        written = [local]
        first = [False] * len(index)
        for c, col in enumerate(columns):
            col_tensors = []
            for k, i in enumerate(index):
                t = _checked_entry(col, i, params[i], sdtype, labels, create, n_quant)
                if col.kind in (AGE, ABSMAX) and first[k]:  # the create column (before this one) made this row's state
                    if col.kind == AGE:
                        made = torch.zeros((), dtype=torch.float32, device=local[k].device)
                    else:
                        made = new_absmax(params[i], n_quant)  # a DTensor for a DTensor param
                    created.append((c, i, made))
                    t = local_tensor(made)
                elif t is None and col.kind == ABSMAX and sdtype is torch.int8:
                    raise ValueError(f"{labels.column(col, i)} is None; the 8-bit state of {labels.param(i)} "
                                     "needs its block scales")
                elif t is None and col.name == create:
                    # like the source, so DTensor params get DTensor state, as in torch.optim
                    made = torch.zeros_like(params[i], dtype=sdtype, memory_format=torch.preserve_format)
                    created.append((c, i, made))
                    t = local_tensor(made)
                    first[k] = True
                col_tensors.append(t)
            table.set_column(col.name, col_tensors)
            if col.kind not in (STEP, AGE):  # one-element counters, checked on their own
                written.append(col_tensors)
        table.check_no_overlap(written)
        table.set_row_flag("first_step", first)
        table.refresh_grads([local_tensor(grads[i]) for i in index])
        if fast_checks.enabled():
            table.enable_fast_checks()
        if "norms" in layout.columns:
            attach_norm_slots(table)
        batches.append(Batch(index, table, sdtype, [params[i] for i in index]))
    return batches, created


def _check_quantized_batch(params, index, columns, labels: Labels, sdtype: torch.dtype) -> None:
    """8-bit state comes with its block scales (an ABSMAX column), other state without."""
    absmax = next((col for col in columns if col.kind == ABSMAX), None)
    has_state = any(col.kind == STATE for col in columns)
    if sdtype is torch.int8 and has_state:
        if absmax is None:
            raise ValueError(f"8-bit state (int8 codes) of {labels.param(index[0])} needs its block scales: "
                             "pass the absmax list (fusedopt.functional docs, 'state_dtype')")
    elif absmax is not None:
        i = next((i for i in index if absmax.tensors[i] is not None), None)
        if i is not None:
            raise ValueError(f"{labels.column(absmax, i)} is given, but the state of {labels.param(i)} is "
                             f"{sdtype}; block scales go with 8-bit (torch.int8) state only")


def _batch_state_dtype(p: torch.Tensor, index, columns, labels: Labels, want: Optional[torch.dtype]) -> torch.dtype:
    """fp64 params keep fp64 state; other params fp32 (default), bf16 or 8-bit state."""
    if p.dtype is torch.float64:
        if want is torch.int8:
            raise TypeError(f"{labels.param(index[0])} is float64: 8-bit state (state_dtype=torch.int8) is for "
                            "float32, float16 and bfloat16 params; fp64 params keep fp64 state")
        return torch.float64
    if want is not None:
        if want not in _STATE_DTYPES:
            raise TypeError(f"state_dtype is {want}; expected one of {', '.join(map(str, _STATE_DTYPES))}")
        return want
    for col in columns:
        if col.kind == STATE:
            for i in index:
                t = col.tensors[i]
                if t is not None:
                    t = local_tensor(t)
                    if not isinstance(t, torch.Tensor) or t.dtype not in _STATE_DTYPES:
                        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                        raise TypeError(f"{labels.column(col, i)} has dtype {got}; expected torch.float32, "
                                        f"torch.bfloat16 or torch.int8 (8-bit) state for {p.dtype} params")
                    return t.dtype
    return torch.float32


def _checked_entry(col: Column, i: int, param: torch.Tensor, sdtype: torch.dtype, labels: Labels,
                   create: Optional[str], n_quant: int):
    """The local tensor of one list entry after its checks (None where allowed)."""
    t, p = col.tensors[i], local_tensor(param)
    what = labels.column(col, i)
    if col.kind == ABSMAX and sdtype is not torch.int8:
        return None  # checked by _check_quantized_batch: all None
    if t is None:
        if col.name == create or col.kind == AGE:
            return None
        if col.kind == ABSMAX and create is not None:
            return None  # made with the create column's state, or an error there
        if col.kind == MASTER:
            if p.dtype in _SIXTEEN_BIT:
                raise ValueError(f"{what} is None; a call with master weights needs one for every "
                                 f"float16/bfloat16 param of the same dtype")
            return None
        raise ValueError(f"{what} is None; expected a tensor like its parameter")
    if col.kind == ABSMAX:  # sharded params' scales are DTensors of a layout of their own (quant8.py)
        check_absmax(t, param, n_quant, what)
        return local_tensor(t)
    t = local_tensor(t)
    if col.kind in (STEP, AGE):
        check_step_tensor(t, p, what)
    elif col.kind == MASTER:
        if p.dtype not in _SIXTEEN_BIT:
            raise ValueError(f"{what}: master weights are for float16/bfloat16 params; this param is {p.dtype}")
        check_like(t, p, what, torch.float32)
    else:
        check_like(t, p, what, sdtype)
    return t
