"""LARS and LAMB as functions over lists of tensors: steps scaled per tensor by
a trust ratio of norms (csrc/ops/lars.h, lamb.h).

One ``_C`` call per (device, dtype) batch computes the per-tensor norms and
applies the update. With FSDP2-sharded DTensor params the call is split in
two around an all-reduce of the local norm sums over the shard group.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

from .. import _hyper
from .._dtensor import reduce_rows_over_shards
from .._kernels import (MASTER, STATE, STEP, Column, Labels, StepPlan, grad_sq_norms_into, kernel_layout,
                        launch_norm_scaled, prepare, shape_str)
from ._step import PreparedStep, checked_rounding_seed, compiling, device_scalars, finish
from .elementwise import absmax_columns, momentum_columns

_LARS = kernel_layout("lars")
_LAMB = kernel_layout("lamb")
ClipSums = Union[torch.Tensor, Mapping[torch.device, torch.Tensor]]


def _run_norm_scaled(plan: StepPlan, lr, grad_scale, found_inf, hyper: dict, flags: int, adapts: bool,
                     split_flags: tuple, split: bool, clipping: bool = False, clip_sums=None, rounding_seed=None):
    """Runs each batch in one call, or (sharded params, or ``split`` for tests)
    in two calls with the norm slots all-reduced over the shard group between."""
    # checked now, before anything is written
    scalars = device_scalars(plan, lr, grad_scale, found_inf, rounding_seed=rounding_seed)

    def run(clip_grad_sq: Optional[ClipSums] = None) -> None:
        sums = clip_sums_for(plan, clip_grad_sq if clip_grad_sq is not None else clip_sums) if clipping else None
        for b in plan.batches:
            dev = b.table.device
            grad_sq = None if sums is None else sums[dev]

            def call(extra: int) -> None:
                launch_norm_scaled(b.table, b.state_dtype, scalars[dev], hyper, flags | extra, grad_sq)

            if not ((b.sharded or split) and adapts):
                call(0)
                continue
            call(split_flags[0])
            if b.sharded:
                reduce_rows_over_shards(b.table.norms, b.sources)
            call(split_flags[1])
    return run


def clip_sums_for(plan: StepPlan, given: Optional[ClipSums]) -> Dict[torch.device, torch.Tensor]:
    """LAMB's per-grad sums of squares for the clipping norm, per device: the
    given ones, else those of this call's grads."""
    if given is None:
        return lamb_clip_sums([plan])
    sums = {b.table.device: given for b in plan.batches} if isinstance(given, torch.Tensor) else given
    for b in plan.batches:  # all checked before the first batch launches
        dev = b.table.device
        t = sums.get(dev) if isinstance(sums, Mapping) else None
        if not isinstance(t, torch.Tensor) or t.dtype is not torch.float64 or t.device != dev or t.dim() != 1 \
                or not t.is_contiguous():
            got = shape_str(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"clip_grad_sq must give a contiguous 1-D float64 tensor on {dev} (per-grad sums of "
                             f"squares, as lamb_clip_sums returns); got {got}")
    return sums


def lamb_clip_sums(plans: Sequence[Union[StepPlan, PreparedStep]]) -> Dict[torch.device, torch.Tensor]:
    """Per-grad sums of squares of every grad of the (prepared) calls, per device,
    so that one clipping norm covers them all (an optimizer's param groups).
    Under FSDP2 each sum is all-reduced over its shard group first; with several
    devices every device gets all sums, in one fixed order."""
    by_device: Dict[torch.device, list] = {}
    for plan in plans:
        plan = plan.plan if isinstance(plan, PreparedStep) else plan
        for b in plan.batches:
            by_device.setdefault(b.table.device, []).append(b)
    local = {}
    for dev, batches in by_device.items():
        tables = [b.table for b in batches]
        out = torch.empty(sum(len(t) for t in tables), dtype=torch.float64, device=dev)
        grad_sq_norms_into(tables, out)
        if any(b.sharded for b in batches):
            reduce_rows_over_shards(out, [p for b in batches for p in b.sources])
        local[dev] = out
    return share_across_devices(local)


def share_across_devices(local: Dict[torch.device, torch.Tensor]) -> Dict[torch.device, torch.Tensor]:
    """Every device gets the sums of all devices, concatenated in one fixed order
    (asynchronous copies, no host sync); one device: unchanged."""
    if len(local) <= 1:
        return local
    return {dev: torch.cat([t.to(dev, non_blocking=True) for t in local.values()]) for dev in local}


def lars(params: List[torch.Tensor], grads: List[torch.Tensor], momentum_buffer_list: List[Optional[torch.Tensor]],
         grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None, *, lr,
         momentum: float, dampening: float, weight_decay: float, nesterov: bool, trust_coeff: float, eps: float,
         trust_clip: bool, always_adapt: bool, master_params: Optional[List[Optional[torch.Tensor]]] = None,
         state_dtype: Optional[torch.dtype] = None, momentum_buffer_ages: Optional[List[Optional[torch.Tensor]]] = None,
         momentum_buffer_absmaxes: Optional[List[Optional[torch.Tensor]]] = None,
         stochastic_rounding: bool = False, rounding_seed=None,
         plan: Optional[StepPlan] = None, launch: bool = True, _names=None, _split: bool = False):
    r"""LARS over lists of tensors (the formulas of :class:`fusedopt.LARS`), in the
    shape of :func:`sgd`: momentum buffers None on the first step are created and
    put into ``momentum_buffer_list`` after the call.

    Per tensor: :math:`r = \eta\lVert p\rVert / (\lVert g\rVert + \lambda\lVert p\rVert + \epsilon)`
    (1 where a norm is 0; :math:`\min(r/\gamma, 1)` with trust_clip), used when
    :math:`\lambda \ne 0` or always_adapt; :math:`d = (g + \lambda p) r`; then
    torch.optim.SGD's momentum on d. Norms are summed in the param's precision
    class (fp64 for fp64 params). ``master_params``, ``state_dtype`` (int8: 8-bit
    buffers), ``momentum_buffer_ages``, ``momentum_buffer_absmaxes``, ``stochastic_rounding``,
    ``rounding_seed``, ``plan`` and ``launch`` as in :func:`sgd`. ``_split`` (tests): take the
    two-call path of sharded params on plain tensors.
    """
    h = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
             trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, always_adapt=always_adapt)
    _hyper.check_lars(h)
    seed = checked_rounding_seed(stochastic_rounding, rounding_seed, master_params)
    if compiling():
        from .. import _ops
        return _ops.compiled_step("lars", params, grads, dict(momentum_buffer_list=momentum_buffer_list,
                                                              momentum_buffer_ages=momentum_buffer_ages,
                                                              momentum_buffer_absmaxes=momentum_buffer_absmaxes,
                                                              master_params=master_params),
                                  {k: v for k, v in h.items() if k != "lr"}, lr, grad_scale, found_inf,
                                  rounding_seed=seed)
    columns = momentum_columns(momentum, momentum_buffer_list, momentum_buffer_ages, momentum_buffer_absmaxes)
    if master_params is not None:
        columns.append(Column("master", "master_params", MASTER, master_params))
    plan = prepare(_LARS, params, grads, columns, labels=Labels(_names), state_dtype=state_dtype,
                   create="momentum_buffer", plan=plan)
    flags = _LARS.flags(nesterov=nesterov, trust_clip=trust_clip, always_adapt=always_adapt)
    split_flags = (_LARS.flags(norms_only=True), _LARS.flags(norms_given=True))
    adapts = weight_decay != 0 or always_adapt
    run = _run_norm_scaled(plan, lr, grad_scale, found_inf, h, flags, adapts, split_flags, _split,
                           rounding_seed=seed)
    return finish(plan, columns, run, launch)


def lamb(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
         exp_avg_sqs: List[torch.Tensor], state_steps: List[torch.Tensor], grad_scale: Optional[torch.Tensor] = None,
         found_inf: Optional[torch.Tensor] = None, *, lr, beta1, beta2, eps: float, weight_decay: float,
         bias_correction: bool, grad_averaging: bool, max_grad_norm: Optional[float], trust_clip: bool,
         always_adapt: bool, decoupled_decay: bool, master_params: Optional[List[Optional[torch.Tensor]]] = None,
         state_dtype: Optional[torch.dtype] = None, clip_grad_sq: Optional[ClipSums] = None,
         absmaxes: Optional[List[torch.Tensor]] = None,
         stochastic_rounding: bool = False, rounding_seed=None,
         plan: Optional[StepPlan] = None, launch: bool = True, _names=None, _split: bool = False):
    r"""LAMB over lists of tensors (the formulas of :class:`fusedopt.LAMB`), in the
    shape of :func:`adam` without amsgrad.

    With ``max_grad_norm`` the grads are divided by
    :math:`\max(\lVert (g_1, g_2, \dots)\rVert / \text{max\_grad\_norm}, 1)`, the norm
    over this call's grads, or over the per-grad sums of squares ``clip_grad_sq``
    (a tensor, or one per device, from :func:`lamb_clip_sums`) when given.
    ``master_params``, ``state_dtype`` (int8: 8-bit moments), ``absmaxes`` (their block
    scales, float32 ``[2, blocks]``), ``stochastic_rounding``, ``rounding_seed``, ``plan`` and
    ``launch`` as in :func:`adam`;
    ``_split`` as in :func:`lars`.
    """
    beta1, beta2 = _hyper.host_float(beta1, "beta1"), _hyper.host_float(beta2, "beta2")
    h = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
             bias_correction=bias_correction, grad_averaging=grad_averaging, trust_clip=trust_clip,
             always_adapt=always_adapt, decoupled_decay=decoupled_decay)
    _hyper.check_lamb(h)
    _hyper.check_betas(beta1, beta2)
    seed = checked_rounding_seed(stochastic_rounding, rounding_seed, master_params)
    if compiling():
        from .. import _ops
        return _ops.compiled_step("lamb", params, grads, dict(exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                                                              state_steps=state_steps, master_params=master_params,
                                                              absmaxes=absmaxes),
                                  {k: v for k, v in h.items() if k != "lr"}, lr, grad_scale, found_inf,
                                  clip_grad_sq=clip_grad_sq, rounding_seed=seed)
    columns = [Column("exp_avg", "exp_avgs", STATE, exp_avgs), Column("exp_avg_sq", "exp_avg_sqs", STATE, exp_avg_sqs),
               Column("step", "state_steps", STEP, state_steps)]
    if master_params is not None:
        columns.append(Column("master", "master_params", MASTER, master_params))
    columns += absmax_columns(absmaxes, "absmaxes")
    plan = prepare(_LAMB, params, grads, columns, labels=Labels(_names), state_dtype=state_dtype, plan=plan)
    flags = _LAMB.flags(bias_correction=bias_correction, grad_averaging=grad_averaging, trust_clip=trust_clip,
                        always_adapt=always_adapt, decoupled=decoupled_decay, clip_grads=max_grad_norm is not None)
    # The apply call of a split step advances the step counters.
    split_flags = (_LAMB.flags(moments_only=True), _LAMB.flags(apply_only=True))
    if clip_grad_sq is not None and max_grad_norm is not None:
        clip_sums_for(plan, clip_grad_sq)  # checked now, before anything is written
    hyper = dict(h, max_grad_norm=float(max_grad_norm or 0.0))  # the kernel reads it only when clipping
    adapts = weight_decay != 0 or always_adapt
    run = _run_norm_scaled(plan, lr, grad_scale, found_inf, hyper, flags, adapts, split_flags, _split,
                           clipping=max_grad_norm is not None, clip_sums=clip_grad_sq, rounding_seed=seed)
    return finish(plan, columns, run, launch)
