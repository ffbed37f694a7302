"""Fused SGD with momentum: a drop-in for torch.optim.SGD."""
from __future__ import annotations

import weakref
from typing import Dict, Set, Tuple

import torch

from .. import _hyper, functional
from .base import FusedOptimizer
from .state import TrackedState


class MomentumState:
    """The state of SGD-style momentum, shared by SGD and LARS: an optional
    ``momentum_buffer`` per param (when momentum != 0), made by the first step.

    Each buffer goes with an age counter on its device (the steps that wrote it;
    functional ``momentum_buffer_ages``), kept here, not in the state: a step that
    AMP skips (GradScaler's found_inf) leaves the age of a buffer it made at 0, so
    the next step is still a first step, as with torch.optim, which never runs a
    skipped step. ``state_dict()`` leaves such never-written buffers out, as a
    torch.optim checkpoint would not have them. A buffer fusedopt did not make
    (loaded, or set by the user) counts as written."""

    def _required_state_keys(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _state_key_required_when_loaded(self, key):
        return False  # a missing buffer means "first step", as in torch

    def _state_lists(self, group, states):
        # None (no buffer yet: a first momentum step) is filled in by the functional entry.
        buffers = [st.get("momentum_buffer") for st in states]
        lists = {"momentum_buffer_list": buffers}
        if group["momentum"] != 0:
            lists["momentum_buffer_ages"] = [None if b is None else self._buffer_age(b) for b in buffers]
            if self._quantized(group):
                lists["momentum_buffer_absmaxes"] = [st.get("absmax") for st in states]
        return lists

    def _after_launch(self, group, entry, created):
        store_momentum_buffers(self, entry, created)
        ages = entry.lists.get("momentum_buffer_ages")
        if ages is not None:
            for i in created:
                self._keep_age(entry.lists["momentum_buffer_list"][i], ages[i])

    # ---- buffer ages: id(buffer) -> (weak reference to it, its age tensor) -------------
    def _ages(self) -> Dict[int, Tuple[weakref.ref, torch.Tensor]]:
        return self.__dict__.setdefault("_buffer_ages", {})

    def _keep_age(self, buf: torch.Tensor, age: torch.Tensor) -> None:
        ages, key = self._ages(), id(buf)

        def forget(ref, ages=ages, key=key):  # the buffer is gone; its id may be reused
            if key in ages and ages[key][0] is ref:
                del ages[key]
        ages[key] = (weakref.ref(buf, forget), age)

    def _buffer_age(self, buf: torch.Tensor) -> torch.Tensor:
        kept = self._ages().get(id(buf))
        if kept is not None and kept[0]() is buf:
            return kept[1]
        age = torch.ones((), dtype=torch.float32, device=buf.device)  # not made here: written before
        self._keep_age(buf, age)
        return age

    def _unwritten_buffers(self) -> Set[int]:
        """ids of buffers no step has written yet (a host read of the ages: not for step())."""
        alive = [(key, age) for key, (ref, age) in self._ages().items() if ref() is not None]
        if not alive:
            return set()
        values = torch.stack([age.detach().to("cpu") for _, age in alive]).tolist()
        return {key for (key, _), v in zip(alive, values) if v == 0}

    def state_dict(self):
        sd = super().state_dict()
        hidden = self._unwritten_buffers()
        if hidden:
            for k, st in list(sd["state"].items()):
                buf = st.get("momentum_buffer")
                if buf is not None and id(buf) in hidden:
                    st = {key: v for key, v in st.items() if key != "momentum_buffer"}
                    if st:
                        sd["state"][k] = st
                    else:
                        del sd["state"][k]
        return sd


class SGD(MomentumState, FusedOptimizer):
    r"""SGD with momentum, the same arguments and numbers as ``torch.optim.SGD``.

    For each param p with grad g (after AMP unscaling):

    .. math::
        g &\leftarrow -g \text{ if maximize};\quad g \leftarrow g + \lambda p \text{ if weight\_decay } \lambda \ne 0 \\
        b &\leftarrow g \text{ (first step)}, \quad b \leftarrow \mu b + (1-\tau) g \text{ (later)} \\
        d &= g + \mu b \text{ if nesterov else } b \quad (d = g \text{ when } \mu = 0) \\
        p &\leftarrow p - \gamma d

    Args:
        params: iterable of parameters or dicts defining param groups.
        lr (float or Tensor): learning rate :math:`\gamma` (default 1e-3).
        momentum (float): :math:`\mu` (default 0).
        dampening (float): :math:`\tau` (default 0).
        weight_decay (float): L2 penalty :math:`\lambda` (default 0).
        nesterov (bool): Nesterov momentum (needs momentum > 0 and dampening = 0).
        maximize (bool): maximize the objective instead of minimizing.
        master_weights (bool): keep an fp32 master copy of fp16/bf16 params in
            ``state['master']``; the kernel updates the master and writes the param
            rounded to nearest even (ignored for fp32/fp64 params).
        state_dtype (torch.dtype, optional): ``torch.float32`` (default),
            ``torch.bfloat16`` or ``torch.int8`` (8-bit blockwise buffer: int8 codes
            and ``state['absmax']``, float32 ``[1, ceil(numel/256)]``; README "8-bit
            states") for the momentum buffer (fp64 params keep fp64; int8 refuses them).
        stochastic_rounding (bool): store fp16/bf16 params rounded up or down at
            random instead of to nearest, so that steps below half an ulp still move
            them on average: no fp32 master copy (excludes master_weights; ignored for
            fp32/fp64 params). README "Stochastic rounding".
        seed (int, optional): seed of the rounding bits (default: ``torch.initial_seed()``),
            kept with the step count in ``group["rounding_state"]`` (device words; in ``state_dict()``).
        foreach, fused: accepted for compatibility; fusedopt is always fused.

    One ``_C`` call per (device, dtype) batch of a group per step. State:
    ``momentum_buffer`` only when momentum != 0, as in torch. Bytes per param
    (param + grad + buffer [+ master]) with momentum: fp32 params 12 (fp32 buffer),
    10 (bf16 buffer) or 9.02 (8-bit); bf16/fp16 params 8, 6 or 5.02, and 4 more
    with master_weights.
    Table: README "Mixed precision".
    """

    _functional = functional.sgd
    _quantized_states = (("momentum_buffer", True),)
    _supports_stochastic_rounding = True

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, master_weights=False,
                 state_dtype=None, stochastic_rounding=False, seed=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, differentiable=differentiable,
                        master_weights=master_weights, state_dtype=state_dtype,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, seed=seed)

    def _check_hyperparameters(self, group, where):
        _hyper.check_momentum(group, where)

    def _functional_kwargs(self, group):
        return dict(momentum=group["momentum"], dampening=group["dampening"], weight_decay=group["weight_decay"],
                    nesterov=group["nesterov"], maximize=group["maximize"])


def store_momentum_buffers(opt: FusedOptimizer, entry, created) -> None:
    """Momentum buffers made by a first step (the functional entry put them in the
    list) become state, as torch.optim.SGD stores them."""
    buffers = entry.lists["momentum_buffer_list"]
    absmaxes = entry.lists.get("momentum_buffer_absmaxes")
    for i in created:
        p, buf = entry.params[i], buffers[i]
        new = {"momentum_buffer": buf}
        if absmaxes is not None:  # 8-bit buffers: their block scales were made with them
            new["absmax"] = absmaxes[i]
        st = opt.state.get(p)
        if st is None:
            opt.state[p] = TrackedState(opt._epoch, new)
        else:
            st.update(new)
