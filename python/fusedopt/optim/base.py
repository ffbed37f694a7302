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
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _kernels
from .._kernels import RowTable


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


class _Batch:
    """The params of one group on one (device, dtype), and their kernel rows."""

    __slots__ = ("index", "table", "pending")

    def __init__(self, index: List[int], table: RowTable, pending: Dict[torch.Tensor, dict]):
        self.index = index
        self.table = table
        self.pending = pending


class FusedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses define the state, the checks and the kernel call."""

    # torch.amp.GradScaler sets `grad_scale` and `found_inf` on the optimizer and
    # lets step() unscale and skip; the kernels do both without a host sync.
    _step_supports_amp_scaling = True

    # Tensor entries of a param's state besides 'step' (subclasses set these).
    state_tensor_keys: Tuple[str, ...] = ()

    def __init__(self, params, defaults: dict):
        for k in ("foreach", "fused"):
            defaults.pop(k, None)  # accepted for drop-in compatibility; always fused
        if defaults.pop("differentiable", False):
            raise ValueError("fusedopt optimizers do not support differentiable=True")
        self._epoch = [0]
        self._group_cache: Dict[int, tuple] = {}
        super().__init__(params, defaults)
        for gi, group in enumerate(self.param_groups):
            self.check_hyperparameters(group, gi)

    # ---- hooks for subclasses ------------------------------------------------
    def check_hyperparameters(self, group: dict, gi: int) -> None:
        raise NotImplementedError

    def state_dtype(self, group: dict, p: torch.Tensor) -> torch.dtype:
        """dtype of the moment/momentum states: fp64 for fp64 params, else fp32."""
        return torch.float64 if p.dtype is torch.float64 else torch.float32

    def new_state(self, group: dict, p: torch.Tensor) -> dict:
        """State of a param seen for the first time (not yet stored)."""
        raise NotImplementedError

    def needs_new_state(self, group: dict, st: Optional[dict]) -> bool:
        """True when p's stored state (None if absent) must be replaced by new_state() on this step."""
        return not st

    def fill_table(self, table: RowTable, group: dict, states: Sequence[dict]) -> None:
        """Sets the state columns of a freshly built table."""
        raise NotImplementedError

    def launch(self, table: RowTable, group: dict, grad_scale, found_inf) -> None:
        raise NotImplementedError

    def before_launch(self, work: Sequence[Tuple[dict, "_Batch"]]) -> None:
        """Runs once per step after all checks, before the first launch (LAMB's global grad norm)."""

    # ---- step ----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        work = []
        for gi, group in enumerate(self.param_groups):
            self.check_hyperparameters(group, gi)
            for batch in self._prepare_group(gi, group):
                work.append((group, batch))
        # Everything is checked: commit new state, then write.
        committed = False
        for group, batch in work:
            for p, st in batch.pending.items():
                if not st:
                    # Nothing to keep (SGD without momentum): torch stores no
                    # entry either, and committing one would bump the epoch and
                    # rebuild the row tables on every step.
                    continue
                self.state[p] = TrackedState(self._epoch, st)
                committed = True
        self.before_launch(work)
        for group, batch in work:
            self.launch(batch.table, group, self._amp_scalar(grad_scale, batch.table.device),
                        self._amp_scalar(found_inf, batch.table.device))
        if committed:
            self._epoch[0] += 1  # first-step flags and pointers change: rebuild next time
        return loss

    @staticmethod
    def _amp_scalar(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
        if t is None:
            return None
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
            if not any(b.table.params_changed() for b in batches):
                for b in batches:
                    b.table.refresh_grads(grads if len(batches) == 1 else [grads[i] for i in b.index])
                return batches
        batches = self._build_batches(gi, group, params, grads)
        self._group_cache[gi] = (ids, self._epoch[0], batches)
        return batches

    def _build_batches(self, gi: int, group: dict, params: List[torch.Tensor],
                       grads: List[torch.Tensor]) -> List[_Batch]:
        position = {id(p): i for i, p in enumerate(group["params"])}
        by_key: Dict[tuple, List[int]] = {}
        for i, p in enumerate(params):
            name = param_name(group, gi, position[id(p)])
            _kernels.check_param(p, name)
            by_key.setdefault((p.device, p.dtype), []).append(i)
        batches = []
        for index in by_key.values():
            ps = [params[i] for i in index]
            names = [param_name(group, gi, position[id(p)]) for p in ps]
            pending, states = {}, []
            for p, name in zip(ps, names):
                st = self.state.get(p)
                if self.needs_new_state(group, st):
                    # Built on the side and stored only once the whole step passed.
                    st = {**(st or {}), **self.new_state(group, p)}
                    pending[p] = st
                self.check_state(group, p, st, name)
                states.append(st)
            table = RowTable(ps, names)
            self.fill_table(table, group, states)
            table.refresh_grads([grads[i] for i in index])
            batches.append(_Batch(index, table, pending))
        return batches

    def check_state(self, group: dict, p: torch.Tensor, st: dict, name: str) -> None:
        """The stored state of p is what the kernel expects."""
        want = self.state_dtype(group, p)
        for key in self.required_state_keys(group):
            if key not in st or st[key] is None:
                raise ValueError(f"state of {name} has no '{key}'; expected it for these hyperparameters")
            _kernels.check_like(st[key], p, f"state['{key}'] of {name}", want)
        step = st.get("step")
        if step is not None:
            if not isinstance(step, torch.Tensor) or step.numel() != 1 or step.dtype is not torch.float32 \
                    or step.device != p.device:
                raise ValueError(f"state['step'] of {name} must be a one-element float32 tensor on {p.device}")

    def required_state_keys(self, group: dict) -> Tuple[str, ...]:
        return self.state_tensor_keys

    # ---- bookkeeping ---------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_epoch"):
            self._epoch[0] += 1
            self.check_hyperparameters(self.param_groups[-1], len(self.param_groups) - 1)

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
            self.check_hyperparameters(ng, gi)
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
                self.check_state(group, p, st, name)
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
