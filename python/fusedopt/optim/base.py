"""What every fusedopt optimizer shares: the step protocol and the state.

``step()`` runs in two phases. First every param group is checked (hyper-
parameters, params, grads, state) and the kernel rows are prepared; state for
parameters seen for the first time is created on the side. Only when all of
that passed is the new state committed and are the kernels launched, one
``_C`` call per (device, dtype) batch of a group. So an exception leaves
params, grads and state exactly as they were.

Row tables are cached per param group and rebuilt when the set of params with
grads changes, a param's storage moves, or any state entry is replaced (state
dicts are ``TrackedState`` objects that count assignments).

Options every subclass gets from here (see README "Mixed precision"):
``master_weights`` (fp32 master copy of 16-bit params in ``state['master']``,
written to the kernel's master column ``master_column``) and ``state_dtype``
(fp32 or bf16 moment/momentum states). DTensor params (FSDP2) are updated
through their local shards; ``reduce_rows_over_shards`` (over
``reduce_square_norms``) is how norm-based optimizers (LARS, LAMB) sum squared
norms over the shard group between passes: ``launch`` gets the batch, whose
``sharded`` says whether that is needed. Under ``torch.compile`` the step goes
through the ``fusedopt::fused_step`` custom op (``compiled_launch``; LARS/LAMB
use ``fusedopt::large_batch_step``, python/fusedopt/_ops.py) instead of the
cached tables.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _kernels, _ops
from .._kernels import RowTable

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
        return DTensor
    except Exception:  # torch built without distributed
        return None


_DTensor = _dtensor_type()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 params, grads, states); t itself otherwise."""
    if _DTensor is not None and isinstance(t, _DTensor):
        return t._local_tensor
    return t


def is_dtensor(t: Any) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def shard_groups(t: Any) -> tuple:
    """The process groups over which a DTensor is sharded (one per sharded mesh
    dim); () for plain tensors and replicated DTensors."""
    if not is_dtensor(t):
        return ()
    from torch.distributed.tensor import Shard
    mesh = t.device_mesh
    return tuple(mesh.get_group(d) for d, pl in enumerate(t.placements) if isinstance(pl, Shard))


class TrackedState(dict):
    """A param's state dict that tells its optimizer when an entry is replaced."""

    __slots__ = ("_epoch",)

    def __init__(self, epoch: List[int], *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._epoch = epoch

    def _touch(self) -> None:
        self._epoch[0] += 1

    def __setitem__(self, k, v):
        self._touch()
        super().__setitem__(k, v)

    def __delitem__(self, k):
        self._touch()
        super().__delitem__(k)

    def _mutating(name):  # noqa: N805 - builds the wrappers below
        def method(self, *args, **kwargs):
            self._touch()
            return getattr(dict, name)(self, *args, **kwargs)

        method.__name__ = name
        return method

    update = _mutating("update")
    pop = _mutating("pop")
    popitem = _mutating("popitem")
    clear = _mutating("clear")
    setdefault = _mutating("setdefault")
    del _mutating

    def __reduce__(self):  # pickles (and deep-copies) as a plain dict
        return (dict, (dict(self),))


def check_float(group: dict, key: str, value: Any, *, low: float = 0.0, low_inclusive: bool = True,
                high: Optional[float] = None, high_inclusive: bool = False, gi: int = 0) -> None:
    """Raises ValueError naming the group and hyperparameter unless value is in range."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"param_groups[{gi}]['{key}'] must be a number or a one-element tensor")
        value = float(value.detach().cpu()) if value.device.type == "cpu" else None
        if value is None:
            return  # device tensors are checked where they are read, without a sync
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"param_groups[{gi}]['{key}'] must be a number; got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value)  # nan and inf are always rejected
    ok = ok and (value >= low if low_inclusive else value > low)
    if high is not None:
        ok = ok and (value <= high if high_inclusive else value < high)
    if not ok:
        lo = "[" if low_inclusive else "("
        hi = ("]" if high_inclusive else ")") if high is not None else ")"
        raise ValueError(f"invalid {key} in param_groups[{gi}]: {value}; expected a value in "
                         f"{lo}{low}, {high if high is not None else 'inf'}{hi}")


def param_name(group: dict, gi: int, i: int) -> str:
    names = group.get("param_names")
    if names is not None and i < len(names):
        return f"parameter '{names[i]}' (param_groups[{gi}]['params'][{i}])"
    return f"param_groups[{gi}]['params'][{i}]"


def lr_value(group: dict, device: torch.device):
    """(float lr, device tensor lr or None) for a kernel call on ``device``.

    A CPU tensor lr is read on the host (no device sync); a CUDA tensor lr is
    passed by pointer and read by the kernel, so changing it in place (as the
    torch.optim.lr_scheduler classes do for tensor lrs) needs no recapture."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.device.type == "cpu":
            return float(lr), None
        if lr.device != device or lr.dtype is not torch.float32:
            lr = lr.to(device=device, dtype=torch.float32, non_blocking=True)
        return 0.0, lr.reshape(())
    return float(lr), None


@torch.compiler.disable
def _eager_step_outside_compile(opt: "FusedOptimizer", closure):
    return opt._eager_step(closure)


class _Batch:
    """The params of one group on one (device, dtype), and their kernel rows."""

    __slots__ = ("index", "table", "pending", "sources", "sharded")

    def __init__(self, index: List[int], table: RowTable, pending: Dict[torch.Tensor, dict],
                 sources: List[torch.Tensor]):
        self.index = index
        self.table = table
        self.pending = pending  # param -> complete new state, committed only when every check passed
        self.sources = sources  # the group's params (DTensors under FSDP2); table.params are their locals
        # True when some source is a sharded DTensor: per-tensor sums over the
        # local shards must then be all-reduced (reduce_rows_over_shards).
        self.sharded = any(shard_groups(p) for p in sources)


class FusedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses define the state, the checks and the kernel call.

    A subclass sets ``kernel`` (``_C.multi_tensor_<kernel>``), ``master_column``
    and ``supports_bf16_state``, and implements ``check_hyperparameters``,
    ``new_state``, ``state_columns`` and ``kernel_hyper``; everything else
    (AMP, master weights, state dtype, DTensor shards, torch.compile, capture
    checks, checkpoint loading) is done here.
    """

    # torch.amp.GradScaler sets `grad_scale` and `found_inf` on the optimizer and
    # lets step() unscale and skip; the kernels do both without a host sync.
    _step_supports_amp_scaling = True

    # Tensor entries of a param's state besides 'step' (subclasses set these).
    state_tensor_keys: Tuple[str, ...] = ()
    kernel: str = ""
    master_column: Optional[int] = None  # kernel column of the fp32 master copy
    supports_bf16_state: bool = True

    def __init__(self, params, defaults: dict):
        for k in ("foreach", "fused"):
            defaults.pop(k, None)  # accepted for drop-in compatibility; always fused
        if defaults.pop("differentiable", False):
            raise ValueError("fusedopt optimizers do not support differentiable=True")
        defaults.setdefault("master_weights", False)
        defaults.setdefault("state_dtype", None)
        self._epoch = [0]
        self._group_cache: Dict[int, tuple] = {}
        super().__init__(params, defaults)
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)

    # ---- hooks for subclasses ------------------------------------------------
    def check_hyperparameters(self, group: dict, gi: int) -> None:
        raise NotImplementedError

    def new_state(self, group: dict, p: torch.Tensor) -> dict:
        """State of a param seen for the first time (not yet stored). Tensors like p
        are made with ``torch.zeros_like(p, dtype=self.state_dtype(group, p))`` so that
        DTensor params get DTensor states, as in torch.optim."""
        raise NotImplementedError

    def state_columns(self, group: dict) -> Dict[int, str]:
        """Kernel column -> state key of the tensors the kernel reads and writes."""
        raise NotImplementedError

    def kernel_hyper(self, group: dict) -> Tuple[Tuple[float, ...], int]:
        """The kernel's hyperparameters after lr (csrc/ops/<kernel>.h order) and its flags."""
        raise NotImplementedError

    def fill_table(self, table: RowTable, group: dict, states: Sequence[dict]) -> None:
        """Extra columns after the state columns are set (LARS/LAMB: norm workspace)."""

    def before_launch(self, work) -> None:
        """Runs once per step after all checks, before the first launch (LAMB's global grad norm)."""

    def missing_state(self, group: dict, p: torch.Tensor, st: dict) -> dict:
        """Entries to add to an existing state before this step (e.g. a momentum
        buffer torch saved as None). Rows that get additions are first-step rows."""
        return {}

    # ---- options every optimizer shares --------------------------------------
    def state_dtype(self, group: dict, p: torch.Tensor) -> torch.dtype:
        """dtype of the moment/momentum states: fp64 for fp64 params, else the
        group's ``state_dtype`` (fp32 by default, or bf16)."""
        if p.dtype is torch.float64:
            return torch.float64
        return group.get("state_dtype") or torch.float32

    def uses_master(self, group: dict, p: torch.Tensor) -> bool:
        """An fp32 master copy is kept for 16-bit params when master_weights is on."""
        return bool(group.get("master_weights")) and p.dtype in _SIXTEEN_BIT

    def _check_group(self, group: dict, gi: int) -> None:
        self.check_hyperparameters(group, gi)
        mw = group.get("master_weights", False)
        if not isinstance(mw, bool):
            raise TypeError(f"param_groups[{gi}]['master_weights'] must be a bool; got {type(mw).__name__}")
        if mw and self.master_column is None:
            raise ValueError(f"{type(self).__name__} does not support master_weights")
        sd = group.get("state_dtype")
        allowed = (torch.float32, torch.bfloat16) if self.supports_bf16_state else (torch.float32,)
        if sd is not None and sd not in allowed:
            raise ValueError(f"param_groups[{gi}]['state_dtype'] is {sd!r}; expected None or one of "
                             f"{', '.join(map(str, allowed))}")

    # ---- step ----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        if torch.compiler.is_compiling():
            if type(self).launch is not FusedOptimizer.launch and self._any_dtensor_param():
                # LARS/LAMB with DTensor params (FSDP2) all-reduce norms between
                # kernel passes: that step runs eagerly (a graph break).
                return _eager_step_outside_compile(self, closure)
            return self._compiled_step(closure)
        return self._eager_step(closure)

    def _closure_and_amp(self, closure):
        """(loss of the closure or None, GradScaler's grad_scale, its found_inf)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        return loss, getattr(self, "grad_scale", None), getattr(self, "found_inf", None)

    def _eager_step(self, closure=None):
        loss, grad_scale, found_inf = self._closure_and_amp(closure)
        work = []
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
            for batch in self._prepare_group(gi, group):
                work.append((group, batch))
        amp = {}
        for _, batch in work:
            dev = batch.table.device
            if dev not in amp:
                amp[dev] = (self._amp_scalar(grad_scale, dev, "grad_scale"),
                            self._amp_scalar(found_inf, dev, "found_inf"))
        # Everything is checked: commit new state, then write.
        committed = False
        for group, batch in work:
            if batch.pending:
                if batch.table.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                    raise RuntimeError(
                        "optimizer state is created on the first step and cannot be created inside CUDA graph "
                        "capture (the zero fill would replay): run at least one eager step before capturing")
                for p, st in batch.pending.items():
                    self.state[p] = TrackedState(self._epoch, st)
                committed = True
        self.before_launch(work)
        for group, batch in work:
            self.launch(batch.table, group, *amp[batch.table.device], batch=batch)
        if committed:
            self._epoch[0] += 1  # first-step flags and pointers change: rebuild next time
        return loss

    def launch(self, table: RowTable, group: dict, grad_scale, found_inf, batch: Optional[_Batch] = None) -> None:
        """One batch's kernel call(s). ``batch`` (its ``sources`` and ``sharded``) lets
        norm-based optimizers all-reduce shard sums between passes."""
        lr, lr_tensor = lr_value(group, table.device)
        hyper, flags = self.kernel_hyper(group)
        _kernels.launch(self.kernel, table, self.state_dtype(group, table.params[0]), lr=lr, lr_tensor=lr_tensor,
                        hyper=hyper, flags=flags, grad_scale=grad_scale, found_inf=found_inf)

    @staticmethod
    def _amp_scalar(t, device: torch.device, what: str) -> Optional[torch.Tensor]:
        """GradScaler's scale / found_inf as a 0-d fp32 tensor on ``device``.

        Same device and dtype (the usual case) is a view, no allocation; another
        device is a non-blocking copy, never a host read."""
        if t is None:
            return None
        if not isinstance(t, torch.Tensor):
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise TypeError(f"optimizer.{what} must be a one-element tensor or a number; got {type(t).__name__}")
            return torch.full((), float(t), dtype=torch.float32, device=device)
        if t.numel() != 1 or not t.is_floating_point():
            raise ValueError(f"optimizer.{what} must be a one-element floating-point tensor (set by "
                             f"torch.amp.GradScaler); got {_kernels.shape_str(t)}")
        if t.device != device or t.dtype is not torch.float32:
            t = t.to(device=device, dtype=torch.float32, non_blocking=True)
        return t.reshape(())

    def _prepare_group(self, gi: int, group: dict) -> List[_Batch]:
        params, grads = [], []
        for p in group["params"]:
            g = p.grad
            if g is not None:
                params.append(p)
                grads.append(g)
        if not params:
            return []
        # The required state keys are part of the key: a hyperparameter that
        # adds a state tensor (amsgrad, momentum) changes the table's columns.
        ids = (tuple(map(id, params)), self.required_state_keys(group))
        cached = self._group_cache.get(gi)
        if cached is not None and cached[0] == ids and cached[1] == self._epoch[0]:
            batches = cached[2]
            if cached[3]:  # DTensor params: the shards the table points at must still be theirs
                fresh = self._cached_dtensor_batches(batches, params, grads)
                if fresh is not None:
                    return fresh
            elif not any(b.table.params_changed() for b in batches):
                for b in batches:
                    b.table.refresh_grads(grads if len(batches) == 1 else [grads[i] for i in b.index])
                return batches
        batches = self._build_batches(gi, group, params, grads)
        self._group_cache[gi] = (ids, self._epoch[0], batches, any(map(is_dtensor, params)))
        return batches

    @staticmethod
    def _cached_dtensor_batches(batches, params, grads) -> Optional[List[_Batch]]:
        for b in batches:
            if any(local_tensor(params[i]) is not t for i, t in zip(b.index, b.table.params)) \
                    or b.table.params_changed():
                return None
        for b in batches:
            b.table.refresh_grads([local_tensor(grads[i]) for i in b.index])
        return batches

    def _build_batches(self, gi: int, group: dict, params: List[torch.Tensor],
                       grads: List[torch.Tensor]) -> List[_Batch]:
        position = {id(p): i for i, p in enumerate(group["params"])}
        by_key: Dict[tuple, List[int]] = {}
        for i, p in enumerate(params):
            name = param_name(group, gi, position[id(p)])
            if is_dtensor(p) != is_dtensor(grads[i]):
                raise TypeError(f"{name} and its grad must both be DTensors or both plain tensors")
            lp = local_tensor(p)
            _kernels.check_param(lp, name)
            by_key.setdefault((lp.device, lp.dtype), []).append(i)
        batches = []
        for index in by_key.values():
            ps = [params[i] for i in index]
            names = [param_name(group, gi, position[id(p)]) for p in ps]
            pending, states, first = {}, [], []
            for p, name in zip(ps, names):
                st, added = self._complete_state(group, p)
                if added:
                    pending[p] = st
                first.append(added in ("new", "first"))
                lst = {k: local_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                self.check_state(group, local_tensor(p), lst, name)
                states.append(lst)
            table = RowTable([local_tensor(p) for p in ps], names)
            self._fill_table(table, group, states)
            self.fill_table(table, group, states)
            table.set_flag(_kernels.ROW_FIRST_STEP, first)
            table.refresh_grads([local_tensor(grads[i]) for i in index])
            batches.append(_Batch(index, table, pending, ps))
        return batches

    def _complete_state(self, group: dict, p: torch.Tensor):
        """(state to use this step, what was added: False, "new" or "first").

        "new": a fresh state; "first": an existing state got a missing entry
        (its rows are first-step rows). The stored state is never touched here."""
        st = self.state.get(p)
        if not st:
            st = self.new_state(group, p)
            if self.uses_master(group, p):
                st["master"] = self._new_master(p)
            return st, ("new" if st else False)
        add = dict(self.missing_state(group, p, st))
        if self.uses_master(group, p) and st.get("master") is None:
            add["master"] = self._new_master(p)  # master_weights switched on, or a checkpoint without one
        if not add:
            return st, False
        merged = dict(st)
        merged.update(add)
        return merged, ("first" if len(add) > ("master" in add) else "master")

    @staticmethod
    def _new_master(p: torch.Tensor) -> torch.Tensor:
        return p.detach().to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)

    def _kernel_columns(self, group: dict, p: torch.Tensor) -> Dict[int, str]:
        """Kernel column -> state key for the batch of p: the state columns, plus
        the master column when p keeps an fp32 master copy."""
        cols = dict(self.state_columns(group))
        if self.uses_master(group, p):
            cols[self.master_column] = "master"
        return cols

    def _fill_table(self, table: RowTable, group: dict, states: Sequence[dict]) -> None:
        cols = self._kernel_columns(group, table.params[0])
        written = [table.params]
        for c, key in cols.items():
            tensors = [st[key] for st in states]
            table.set_column(c, tensors)
            if key != "step":
                written.append(tensors)
        table.check_no_overlap(written)

    def check_state(self, group: dict, p: torch.Tensor, st: dict, name: str) -> None:
        """The stored state of p (local shards) is what the kernel expects."""
        want = self.state_dtype(group, p)
        for key in self.required_state_keys(group):
            if key not in st or st[key] is None:
                raise ValueError(f"state of {name} has no '{key}'; expected it for these hyperparameters")
            _kernels.check_like(st[key], p, f"state['{key}'] of {name}", want)
        if self.uses_master(group, p) and st.get("master") is not None:
            # (a missing master is made from the param by _complete_state on the next step)
            _kernels.check_like(st["master"], p, f"state['master'] of {name}", torch.float32)
        step = st.get("step")
        if step is not None:
            if not isinstance(step, torch.Tensor) or step.numel() != 1 or step.dtype is not torch.float32 \
                    or step.device != p.device:
                raise ValueError(f"state['step'] of {name} must be a one-element float32 tensor on {p.device}")

    def required_state_keys(self, group: dict) -> Tuple[str, ...]:
        return self.state_tensor_keys

    # ---- torch.compile -------------------------------------------------------
    def _compiled_step(self, closure=None):
        """The step as dynamo traces it: one ``fusedopt::fused_step`` custom op per
        (device, dtype) batch of a group. The first step, which creates state,
        runs eagerly (one graph break); later steps trace without breaks."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and (p not in self.state or self._needs_completion(group, p)):
                    return _eager_step_outside_compile(self, closure)
        loss, grad_scale, found_inf = self._closure_and_amp(closure)
        work = []  # (group, params of one (device, dtype)): the eager step's batches, in its order
        for group in self.param_groups:
            buckets: Dict[tuple, List[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    buckets.setdefault((p.device, p.dtype), []).append(p)
            work.extend((group, ps) for ps in buckets.values())
        ctx = self.compiled_before_launch(work)
        for group, ps in work:
            cols = self._kernel_columns(group, ps[0])
            hyper, flags = self.kernel_hyper(group)
            lr = group["lr"]
            args = (ps, [p.grad for p in ps], [self.state[p][key] for key in cols.values() for p in ps],
                    list(cols.keys()), [_ops.column_kind(key) for key in cols.values()],
                    _kernels.DTYPE_CODES[self.state_dtype(group, ps[0])],
                    0.0 if isinstance(lr, torch.Tensor) else float(lr),
                    lr if isinstance(lr, torch.Tensor) else None,
                    [float(h) for h in hyper], int(flags), grad_scale, found_inf)
            self.compiled_launch(group, args, ctx)
        return loss

    def compiled_before_launch(self, work) -> Any:
        """Compiled counterpart of ``before_launch``; work is [(group, params)].
        Returns what ``compiled_launch`` needs (LAMB: the clipping sums)."""
        return None

    def compiled_launch(self, group: dict, args: tuple, ctx: Any) -> None:
        """One (device, dtype) batch under torch.compile: args are those of
        ``fusedopt::fused_step`` after the kernel name."""
        _ops.fused_step(self.kernel, *args)

    def _any_dtensor_param(self) -> bool:
        return any(is_dtensor(p) for group in self.param_groups for p in group["params"] if p.grad is not None)

    def _needs_completion(self, group: dict, p: torch.Tensor) -> bool:
        st = self.state[p]
        return bool(self.missing_state(group, p, st)) or (self.uses_master(group, p) and "master" not in st)

    # ---- FSDP2 / DTensor hook for norm-based optimizers ----------------------
    @staticmethod
    def reduce_square_norms(square_norms: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """Sums per-shard squared norms over the shard group of ``param``.

        For LARS/LAMB: compute the sum of squares of each param's (or grad's) LOCAL
        shard (``table.params`` are local tensors), pass them here as one tensor
        (any shape, fp32/fp64) together with any param of the batch, then take the
        sqrt. Plain tensors and DTensors that are not sharded (Replicate only)
        come back unchanged; for sharded DTensors the result is an all-reduce SUM
        over the mesh dims the param is sharded on (async-free, stream-ordered on
        CUDA: no host sync). The reduction across ranks happens in rank order
        inside the collective, so every rank gets the same bits.
        """
        if not is_dtensor(param):
            return square_norms
        import torch.distributed as dist
        from torch.distributed.tensor import Shard
        mesh = param.device_mesh
        for dim, placement in enumerate(param.placements):
            if isinstance(placement, Shard):
                dist.all_reduce(square_norms, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
        return square_norms

    @classmethod
    def reduce_rows_over_shards(cls, sums: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
        """In place: row i of ``sums`` (sums of squares over the local shard of
        ``sources[i]``) becomes the sum over all shards of that tensor. Rows of
        plain or replicated tensors are left alone; rows sharded over the same
        process groups go through one all-reduce (the whole tensor when every
        row is, the common FSDP2 case: no copies)."""
        rows: Dict[tuple, List[int]] = {}
        for i, p in enumerate(sources):
            key = shard_groups(p)
            if key:
                rows.setdefault(key, []).append(i)
        for idx in rows.values():
            if len(idx) == len(sources) and sums.is_contiguous():
                cls.reduce_square_norms(sums, sources[idx[0]])
            else:
                at = torch.tensor(idx, dtype=torch.long).to(sums.device, non_blocking=True)
                part = sums.index_select(0, at)
                cls.reduce_square_norms(part, sources[idx[0]])
                sums.index_copy_(0, at, part)
        return sums

    # ---- bookkeeping ---------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_epoch"):
            self._epoch[0] += 1
            self._check_group(self.param_groups[-1], len(self.param_groups) - 1)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._epoch = [0]
        self._group_cache = {}
        for p, st in list(self.state.items()):
            if isinstance(st, dict) and not isinstance(st, TrackedState):
                self.state[p] = TrackedState(self._epoch, st)

    def __getstate__(self):
        return {"defaults": self.defaults, "state": self.state, "param_groups": self.param_groups}

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        return sd

    # ---- loading -------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a fusedopt or torch.optim checkpoint of the same optimizer.

        Everything is checked and converted first (state tensors are copied to
        the param's device and state dtype); on any error the optimizer is left
        exactly as it was.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups; "
                             f"this optimizer has {len(self.param_groups)}")
        if not isinstance(state_dict["state"], dict):
            raise ValueError("state_dict['state'] must be a dict mapping parameter ids to state dicts")
        id_map = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
                raise ValueError(f"loaded param_groups[{gi}] must be a dict with a 'params' list")
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(f"loaded param_groups[{gi}] has {len(saved['params'])} params; "
                                 f"this optimizer's has {len(group['params'])}")
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                id_map[pid] = (p, gi, i)
        new_groups = []
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            ng = {k: v for k, v in saved.items() if k != "params"}
            for k in ("foreach", "fused", "differentiable"):
                ng.pop(k, None)
            for k, v in self.defaults.items():
                ng.setdefault(k, v)
            ng["params"] = group["params"]
            if "param_names" in group:
                ng["param_names"] = group["param_names"]
            self._check_group(ng, gi)
            new_groups.append(ng)
        new_state = {}
        for pid, saved_st in state_dict["state"].items():
            if pid not in id_map:
                raise ValueError(f"loaded state refers to parameter id {pid!r}, which no param group lists")
            p, gi, i = id_map[pid]
            group = new_groups[gi]
            name = param_name(group, gi, i)
            if not isinstance(saved_st, dict):
                raise ValueError(f"loaded state of {name} must be a dict; got {type(saved_st).__name__}")
            st = self.convert_loaded_state(group, p, dict(saved_st), name)
            if st:
                self.check_state(group, local_tensor(p),
                                 {k: local_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()},
                                 name)
            new_state[p] = st
        # Commit.
        self.state.clear()
        for p, st in new_state.items():
            self.state[p] = TrackedState(self._epoch, st)
        self.param_groups[:] = new_groups
        self._epoch[0] += 1
        self._group_cache.clear()

    def convert_loaded_state(self, group: dict, p: torch.Tensor, saved: dict, name: str) -> dict:
        """Copies a loaded state to p's device and the state dtype, checking it."""
        if not saved:
            return {}
        out = {}
        want = self.state_dtype(group, p)
        for key, value in saved.items():
            if key == "step":
                if isinstance(value, torch.Tensor):
                    if value.numel() != 1:
                        raise ValueError(f"loaded state['step'] of {name} has {value.numel()} elements; expected 1")
                    value = value.detach().reshape(())
                else:
                    value = torch.tensor(float(value))
                out[key] = value.to(device=p.device, dtype=torch.float32, copy=True)
            elif isinstance(value, torch.Tensor):
                if value.shape != p.shape:
                    raise ValueError(f"loaded state['{key}'] of {name} has shape {list(value.shape)}; "
                                     f"expected {list(p.shape)}")
                if not value.is_floating_point():
                    raise TypeError(f"loaded state['{key}'] of {name} has dtype {value.dtype}; expected a float")
                dtype = torch.float32 if key == "master" else want
                out[key] = value.detach().to(device=p.device, dtype=dtype, copy=True).contiguous()
            else:
                out[key] = value
        for key in self.required_state_keys(group):
            if out.get(key) is None and self.state_key_required_when_loaded(group, key):
                raise ValueError(f"loaded state of {name} has no '{key}'")
        return out

    def state_key_required_when_loaded(self, group: dict, key: str) -> bool:
        return True
