"""What every fusedopt optimizer shares: the step protocol.

A class keeps hyperparameters, param groups and state, and steps each group
by one call of its functional entry (``fusedopt.functional.<name>``), which
checks all tensors and runs one fused kernel per (device, dtype) batch.

``step()`` runs in two phases, so that an exception leaves params, grads and
state exactly as they were: every group is prepared first (hyperparameters
checked; new state made on the side; the functional entry called with
``launch=False``, which checks every tensor), then new state is committed
and the prepared calls are launched. The lists of state tensors handed to
the functional entry are cached per group and rebuilt when the params with
grads change or a state entry is replaced (``TrackedState`` counts changes);
the functional entry keeps its checked row tables in a ``StepPlan`` per group.

Options every subclass gets from here (README "Mixed precision"):
``master_weights`` (an fp32 master copy of 16-bit params in ``state['master']``)
and ``state_dtype`` (fp32 or bf16 moment/momentum states); and, where the
class sets ``_supports_stochastic_rounding``, ``stochastic_rounding`` (16-bit
params without master rounded up or down at random; README "Stochastic
rounding") with the optimizer's ``seed``: each group with it keeps its seed
words in ``group["rounding_state"]``, an int64 tensor [seed, steps, group
index] on its params' device that the kernels read and ``step()`` advances on
the device (so steps can be captured in a CUDA graph, and it is saved with the
param groups in ``state_dict()``). Under
``torch.compile`` the functional entries become custom ops (python/fusedopt/_ops.py).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _C, _hyper
from .._dtensor import is_dtensor, local_tensor
from .._kernels.checks import check_param, check_rounding_words
from ..functional import StepPlan, stochastic_rounding_state
from ..functional._step import check_calls_apart
from . import state as _state
from .state import ROUNDING_STATE, TrackedState

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@torch.compiler.disable
def _eager_step_outside_compile(opt: "FusedOptimizer", closure):
    return opt._eager_step(closure)


class _GroupLists:
    """The tensors of one group's step besides the grads, kept while unchanged.
    ``group_params``: a copy of the group's params list when this was built."""

    __slots__ = ("key", "params", "names", "lists", "master", "group_params")

    def __init__(self, key, params, names, lists, master, group_params=None):
        self.key, self.params, self.names, self.lists, self.master = key, params, names, lists, master
        self.group_params = group_params


class FusedOptimizer(torch.optim.Optimizer):
    """Base class. A subclass sets ``_functional`` (its functional entry),
    ``_supports_master`` and ``_supports_bf16_state``, and implements
    ``_check_hyperparameters``, ``_required_state_keys``, ``_new_state``,
    ``_state_lists`` and ``_functional_kwargs``."""

    # torch.amp.GradScaler sets `grad_scale` and `found_inf` on the optimizer and
    # lets step() unscale and skip; the kernels do both without a host sync.
    _step_supports_amp_scaling = True

    _functional: Callable = None
    _supports_master = True
    _supports_bf16_state = True
    # 8-bit blockwise states (state_dtype=torch.int8): (state key, signed code) of each
    # quantized state, in the order of the rows of state['absmax'] (README "8-bit states").
    _quantized_states: Tuple[Tuple[str, bool], ...] = ()
    # The functional entry takes stochastic_rounding and rounding_seed (SGD, Adam, LARS, LAMB).
    _supports_stochastic_rounding = False
    # Norm-scaled steps (LARS, LAMB) all-reduce norms between two kernel calls
    # for FSDP2 params, Muon all-gathers matrices: under torch.compile such a step runs eagerly.
    _eager_for_dtensors_when_compiled = False

    def __init__(self, params, defaults: dict, seed: Optional[int] = None):
        for k in ("foreach", "fused"):
            defaults.pop(k, None)  # accepted for drop-in compatibility; always fused
        if defaults.pop("differentiable", False):
            raise ValueError("fusedopt optimizers do not support differentiable=True")
        defaults.setdefault("master_weights", False)
        defaults.setdefault("state_dtype", None)
        if self._supports_stochastic_rounding:
            defaults.setdefault("stochastic_rounding", False)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None; got {seed!r}")
        # Stochastic rounding: step s of group g rounds with stochastic_rounding_seed(seed, s, g),
        # derived by the kernel from the group's words (group[ROUNDING_STATE], made by
        # _ensure_rounding_state); seed None: torch.initial_seed() now.
        self._rounding_seed = torch.initial_seed() if seed is None else seed
        self._epoch = [0]
        self._group_cache: Dict[int, _GroupLists] = {}
        self._plans: Dict[int, StepPlan] = {}
        self._apart_memo: list = []  # check_calls_apart's cache of the groups' merged ranges
        super().__init__(params, defaults)
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)

    # ---- what subclasses define -----------------------------------------------
    def _check_hyperparameters(self, group: dict, where: str) -> None:
        raise NotImplementedError

    def _required_state_keys(self, group: dict) -> Tuple[str, ...]:
        """State tensors a stored state must have for these hyperparameters."""
        return ()

    def _new_state(self, group: dict, p: torch.Tensor) -> dict:
        """State of a param seen for the first time (not yet stored). Tensors like p
        are made with ``torch.zeros_like`` so that DTensor params get DTensor states."""
        return {}

    def _state_lists(self, group: dict, states: Sequence[dict]) -> Dict[str, list]:
        """The functional entry's state list arguments from the params' states."""
        raise NotImplementedError

    def _functional_kwargs(self, group: dict) -> Dict[str, Any]:
        """The functional entry's hyperparameter keywords (lr excluded)."""
        raise NotImplementedError

    def _state_key_required_when_loaded(self, key: str) -> bool:
        return True

    def _after_launch(self, group: dict, entry: _GroupLists, created: Sequence[int]) -> None:
        """After the kernels ran; ``created``: positions in ``entry.params`` whose
        state the step made (SGD, LARS: their momentum buffers go into the state)."""

    # ---- options every optimizer shares ----------------------------------------
    def _state_dtype(self, group: dict, p: torch.Tensor) -> torch.dtype:
        """dtype of the moment/momentum states: fp64 for fp64 params, else the
        group's ``state_dtype`` (fp32 by default, or bf16)."""
        if p.dtype is torch.float64:
            return torch.float64
        return group.get("state_dtype") or torch.float32

    def _quantized(self, group: dict) -> bool:
        """Whether the group keeps 8-bit blockwise states."""
        return group.get("state_dtype") is torch.int8

    def _uses_master(self, group: dict, p: torch.Tensor) -> bool:
        """An fp32 master copy is kept for 16-bit params when master_weights is on."""
        return bool(group.get("master_weights")) and p.dtype in _SIXTEEN_BIT

    def _check_group(self, group: dict, gi: int) -> None:
        where = f"param_groups[{gi}]"
        self._check_hyperparameters(group, where)
        mw = group.get("master_weights", False)
        if not isinstance(mw, bool):
            raise TypeError(f"{where}['master_weights'] must be a bool; got {type(mw).__name__}")
        if mw and not self._supports_master:
            raise ValueError(f"{type(self).__name__} does not support master_weights")
        sr = group.get("stochastic_rounding", False)
        if not self._supports_stochastic_rounding:
            if sr is not False:
                raise ValueError(f"{type(self).__name__} does not support stochastic_rounding")
        else:
            _hyper.check_bool(sr, "stochastic_rounding", where)
            if sr and mw:
                raise ValueError(f"{where}: stochastic_rounding=True and master_weights=True exclude each other "
                                 "(stochastic rounding replaces the fp32 master copy of 16-bit params); "
                                 "turn one off")
            if group.get(ROUNDING_STATE) is not None:
                check_rounding_words(group[ROUNDING_STATE], f"{where}['{ROUNDING_STATE}']")
        sd = group.get("state_dtype")
        allowed = (torch.float32, torch.bfloat16) if self._supports_bf16_state else (torch.float32,)
        if self._quantized_states:
            allowed += (torch.int8,)
        if sd is not None and sd not in allowed:
            raise ValueError(f"{where}['state_dtype'] is {sd!r}; expected None or one of "
                             f"{', '.join(map(str, allowed))}")

    @staticmethod
    def _param_label(group: dict, gi: int, i: int) -> str:
        names = group.get("param_names")
        if names is not None and i < len(names):
            return f"parameter '{names[i]}' (param_groups[{gi}]['params'][{i}])"
        return f"param_groups[{gi}]['params'][{i}]"

    def _check_state(self, group: dict, p: torch.Tensor, st: dict, name: str) -> None:
        """The stored state of p has every entry these hyperparameters need (their
        dtypes, shapes and devices are checked by the functional entry)."""
        for key in self._required_state_keys(group):
            if st.get(key) is None and self._state_key_required_when_loaded(key):
                raise ValueError(f"state of {name} has no '{key}'; expected it for these hyperparameters")

    @staticmethod
    def _group_device(group: dict) -> Optional[torch.device]:
        """Where a group's rounding words live: the device of its first param."""
        return local_tensor(group["params"][0]).device if group["params"] else None

    def _new_rounding_state(self, group: dict, gi: int) -> Optional[torch.Tensor]:
        """A group's stochastic-rounding words at step 0: [seed, 0, gi] on the group's
        device (None for a group without params). Made eagerly (at construction,
        add_param_group and load_state_dict): a copy from the host cannot be
        captured in a CUDA graph."""
        device = self._group_device(group)
        if device is None:
            return None
        if _capturing(device):
            raise RuntimeError(
                f"param_groups[{gi}] has stochastic_rounding=True but no '{ROUNDING_STATE}' (its step counter), "
                "which cannot be created inside CUDA graph capture: run at least one eager step before capturing")
        return stochastic_rounding_state(self._rounding_seed, 0, gi, device=device)

    def _ensure_rounding_state(self, group: dict, gi: int) -> None:
        if group.get("stochastic_rounding") and group.get(ROUNDING_STATE) is None:
            words = self._new_rounding_state(group, gi)
            if words is not None:
                group[ROUNDING_STATE] = words

    def _rounding_kwargs(self, group: dict, gi: int, pending: dict) -> dict:
        """The functional keywords of a group's stochastic rounding this step (none
        when off): its device words, the tensor form of the seed, so that no host
        number is fixed into a captured graph or a compiled one. Words a group
        lacks (stochastic_rounding switched on later) go to ``pending``."""
        if not group.get("stochastic_rounding"):
            return {}
        words, device = group.get(ROUNDING_STATE), self._group_device(group)
        if words is None:
            words = pending[gi] = self._new_rounding_state(group, gi)
        elif device is not None and words.device != device and not _capturing(device):
            words = pending[gi] = words.to(device)  # the params moved since (module.to): follow them
        return {} if words is None else dict(stochastic_rounding=True, rounding_seed=words)

    def _advance_rounding(self) -> None:
        """One more step in every group with stochastic rounding, on the device (an
        in-place add, so a captured graph advances it at each replay)."""
        for group in self.param_groups:
            words = group.get(ROUNDING_STATE) if group.get("stochastic_rounding") else None
            if words is not None:
                words[1:2].add_(1)

    # ---- step ------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        if torch.compiler.is_compiling():
            if self._eager_for_dtensors_when_compiled and self._any_dtensor_param():
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
        prepared, pending, rounding = [], {}, {}
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
            rounding_kw = self._rounding_kwargs(group, gi, rounding)
            entry, grads = self._group_lists(gi, group, pending)
            if entry is None:
                continue
            plan = self._plans.get(gi)
            if plan is None:  # the group's lists are rebuilt, never changed in place: owned
                plan = self._plans[gi] = StepPlan(owned_lists=True)
            call = self._call(group, entry, grads, grad_scale, found_inf, plan=plan, launch=False,
                              _names=entry.names, state_dtype=group.get("state_dtype") or torch.float32,
                              **rounding_kw)
            prepared.append((group, entry, call))
        check_calls_apart([call for _, _, call in prepared], self._apart_memo)  # across groups: each checked its own tensors
        # Everything is checked: commit new state, then write.
        if pending:
            if any(p.device.type == "cuda" for p in pending) and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "optimizer state is created on the first step and cannot be created inside CUDA graph "
                    "capture (the zero fill would replay): run at least one eager step before capturing")
            for p, st in pending.items():
                self.state[p] = TrackedState(self._epoch, st)
        for gi, words in rounding.items():
            self.param_groups[gi][ROUNDING_STATE] = words
        self._launch(prepared)
        self._advance_rounding()
        for group, entry, call in prepared:
            if call.created:
                self._after_launch(group, entry, call.created)
        return loss

    def _launch(self, prepared: List[tuple]) -> None:
        for _, _, call in prepared:
            call.launch()

    def _call(self, group: dict, entry: _GroupLists, grads: list, grad_scale, found_inf, **extra):
        return type(self)._functional(entry.params, grads, **entry.lists, **self._functional_kwargs(group),
                                      lr=group["lr"], grad_scale=grad_scale, found_inf=found_inf,
                                      master_params=entry.master, **extra)

    def _group_lists(self, gi: int, group: dict, pending: dict):
        """(the group's params with grads and their state lists, their grads); the
        lists are cached while no param, grad presence or state entry changed.
        New state goes to ``pending``. (None, None) when no param has a grad."""
        group_params = group["params"]
        cached = self._group_cache.get(gi)
        # One C++ pass: the grads, which params have one, and whether the group
        # still holds the very params of the cached lists.
        grads, has_grad, same_params = _C.grads_of(group_params, cached.group_params if cached else None)
        if not grads:
            return None, None
        key = (has_grad, self._required_state_keys(group), bool(group.get("master_weights")), self._epoch[0])
        if cached is not None and same_params and cached.key == key:
            return cached, grads
        params = [p for p, has in zip(group_params, has_grad) if has]
        position = {id(p): i for i, p in enumerate(group["params"])}
        names = [self._param_label(group, gi, position[id(p)]) for p in params]
        states, new = [], False
        for p, name in zip(params, names):
            st, added = self._complete_state(group, p, name)
            if added:
                pending[p] = st
                new = True
            states.append(st)
        master = None
        if any(self._uses_master(group, local_tensor(p)) for p in params):
            master = [st.get("master") for st in states]
        entry = _GroupLists(key, params, names, self._state_lists(group, states), master, list(group_params))
        if not new:  # lists that hold uncommitted state are rebuilt from the committed state next time
            self._group_cache[gi] = entry
        return entry, grads

    def _complete_state(self, group: dict, p: torch.Tensor, name: str):
        """(state to use this step, whether anything was added). The stored state
        is checked, never touched."""
        st = self.state.get(p)
        lp = local_tensor(p)
        if not st:
            check_param(lp, name)  # before making state like it (the functional entry checks the rest)
            st = self._new_state(group, p)
            if self._uses_master(group, lp):
                st["master"] = self._new_master(p)
            return st, bool(st)
        self._check_state(group, lp, st, name)
        if self._uses_master(group, lp) and st.get("master") is None:
            # master_weights switched on, or a checkpoint without one
            return dict(st, master=self._new_master(p)), True
        return st, False

    @staticmethod
    def _new_master(p: torch.Tensor) -> torch.Tensor:
        return p.detach().to(dtype=torch.float32, memory_format=torch.preserve_format, copy=True)

    # ---- torch.compile ---------------------------------------------------------
    def _compiled_step(self, closure=None):
        """The step as dynamo traces it: one functional call (a custom op) per group.
        The first step, which creates state, runs eagerly (one graph break)."""
        for group in self.param_groups:
            if group.get("stochastic_rounding") and group["params"]:
                words = group.get(ROUNDING_STATE)
                if words is None or words.device != self._group_device(group):
                    return _eager_step_outside_compile(self, closure)  # makes or moves them
            for p in group["params"]:
                if p.grad is not None and self._needs_new_state(group, p):
                    return _eager_step_outside_compile(self, closure)
        loss, grad_scale, found_inf = self._closure_and_amp(closure)
        extra = self._compiled_extra()
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self.state[p] for p in params]
            master = [st.get("master") for st in states] if any(self._uses_master(group, p) for p in params) else None
            entry = _GroupLists(None, params, None, self._state_lists(group, states), master)
            self._call(group, entry, [p.grad for p in params], grad_scale, found_inf, **extra(group),
                       **self._rounding_kwargs(group, gi, {}))
        self._advance_rounding()
        return loss

    def _compiled_extra(self) -> Callable[[dict], dict]:
        """Extra keywords of each group's compiled call (LAMB: the clipping sums)."""
        return lambda group: {}

    def _needs_new_state(self, group: dict, p: torch.Tensor) -> bool:
        st = self.state.get(p)
        if not st:
            return True
        if self._uses_master(group, p) and st.get("master") is None:
            return True
        return any(st.get(k) is None for k in self._required_state_keys(group))

    def _any_dtensor_param(self) -> bool:
        return any(is_dtensor(p) for group in self.param_groups for p in group["params"] if p.grad is not None)

    # ---- bookkeeping -----------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_epoch"):
            self._epoch[0] += 1
            self._check_group(self.param_groups[-1], len(self.param_groups) - 1)
            self._ensure_rounding_state(self.param_groups[-1], len(self.param_groups) - 1)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._rounding_seed = getattr(self, "_rounding_seed", torch.initial_seed())
        self._epoch = [0]
        self._group_cache = {}
        self._plans = {}
        self._apart_memo = []
        for p, st in list(self.state.items()):
            if isinstance(st, dict) and not isinstance(st, TrackedState):
                self.state[p] = TrackedState(self._epoch, st)

    def __getstate__(self):
        return {"defaults": self.defaults, "state": self.state, "param_groups": self.param_groups}

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        return _state.mark_codes_format(sd)

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a fusedopt or torch.optim checkpoint of the same optimizer.

        Everything is checked and converted first (state tensors are copied to
        the param's device and state dtype); on any error the optimizer is left
        exactly as it was."""
        _state.load_state_dict(self, state_dict)
