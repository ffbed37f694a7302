"""SGD, Adam and AdamW as functions over lists of tensors, with the arguments of
torch.optim.sgd.sgd / torch.optim.adam.adam / torch.optim.adamw.adamw (torch 2.13).

Each call checks every tensor and hyperparameter first, then runs one ``_C``
call per (device, dtype) batch of the params; the tensors are updated in place
with the numbers of torch's functional form (foreach=False). The update math
is csrc/ops/sgd.h and adam.h.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import _hyper
from .._kernels import (ABSMAX, AGE, MASTER, STATE, STEP, Column, Labels, StepPlan, kernel_layout, launch_elementwise,
                        prepare)
from ._step import checked_rounding_seed, compiling, device_scalars, finish

_SGD = kernel_layout("sgd")
_ADAM = kernel_layout("adam")


def _master_column(master_params) -> List[Column]:
    return [] if master_params is None else [Column("master", "master_params", MASTER, master_params)]


def absmax_columns(absmaxes, arg: str) -> List[Column]:
    """The block scales of 8-bit states (``state_dtype=torch.int8``), when given."""
    return [] if absmaxes is None else [Column("absmax", arg, ABSMAX, absmaxes)]


def momentum_columns(momentum: float, buffers, ages, absmaxes=None) -> List[Column]:
    """SGD's and LARS's momentum state: the buffers, their age counters when the
    caller keeps them (``momentum_buffer_ages``), and the block scales of 8-bit buffers."""
    if momentum == 0:
        return []
    columns = [Column("momentum_buffer", "momentum_buffer_list", STATE, buffers)]
    if ages is not None:
        columns.append(Column("buffer_age", "momentum_buffer_ages", AGE, ages))
    return columns + absmax_columns(absmaxes, "momentum_buffer_absmaxes")


def _run_elementwise(plan: StepPlan, lr, grad_scale, found_inf, hyper: dict, flags: int, rounding_seed=None):
    # checked now, before anything is written
    scalars = device_scalars(plan, lr, grad_scale, found_inf, rounding_seed=rounding_seed)

    def run() -> None:
        for b in plan.batches:
            launch_elementwise(b.table, b.state_dtype, scalars[b.table.device], hyper, flags)
    return run


def sgd(params: List[torch.Tensor], d_p_list: List[torch.Tensor], momentum_buffer_list: List[Optional[torch.Tensor]],
        has_sparse_grad: bool = False, foreach: Optional[bool] = None, fused: Optional[bool] = None,
        grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None, *,
        weight_decay: float, momentum: float, lr, dampening: float, nesterov: bool, maximize: bool,
        master_params: Optional[List[Optional[torch.Tensor]]] = None, state_dtype: Optional[torch.dtype] = None,
        momentum_buffer_ages: Optional[List[Optional[torch.Tensor]]] = None,
        momentum_buffer_absmaxes: Optional[List[Optional[torch.Tensor]]] = None,
        stochastic_rounding: bool = False, rounding_seed=None,
        plan: Optional[StepPlan] = None, launch: bool = True, _names=None):
    r"""SGD with momentum over lists of tensors: ``torch.optim.sgd.sgd``'s arguments and numbers.

    For each param p with grad g (divided by ``grad_scale`` when given):
    :math:`g \leftarrow -g` if maximize; :math:`g \leftarrow g + \lambda p`;
    :math:`b \leftarrow g` on the first step (a ``None`` entry of
    ``momentum_buffer_list``, replaced by the new buffer after the call, as torch
    does), else :math:`b \leftarrow \mu b + (1-\tau) g`; the direction is
    :math:`g + \mu b` with nesterov, else :math:`b`; :math:`p \leftarrow p - \gamma d`.
    When ``found_inf`` is nonzero nothing is written.

    fusedopt keywords:
        master_params: fp32 master copies of float16/bfloat16 params (None: none);
            the kernel updates the master and writes the param rounded from it.
        state_dtype: dtype of buffers created for None entries: float32 (default),
            bfloat16 or int8 (8-bit blockwise buffers; fp64 params: float64).
            Existing buffers must have it.
        momentum_buffer_absmaxes: with ``state_dtype=torch.int8``: the block scales
            of each buffer (float32 ``[1, ceil(numel / 256)]``, see README "8-bit
            states"); None entries get new ones with the new buffers.
        momentum_buffer_ages: one-element float32 counters, one per buffer (None
            where there is none yet), kept by the caller: the steps that wrote
            each buffer. A buffer made by this call gets a new counter (put into
            the list), advanced on the device by every step that is not skipped,
            so that when AMP's ``found_inf`` skips the step that made it the next
            step is still a first step (``b = g``), as if the skipped one never
            happened. Without it a skipped first step leaves a zero buffer that
            the next step treats as a real one (visible only with dampening != 0).
        stochastic_rounding: store float16/bfloat16 params (no master_params)
            rounded up or down at random, with probability proportional to the
            distance, instead of to nearest; fp32/fp64 params are unaffected.
            Needs ``rounding_seed``, the call seed, which must change every step:
            an int in [0, 2**64) (:func:`stochastic_rounding_seed` of a user
            seed, the step and a stream), or the same as an int64 tensor
            ``[seed, step, stream]`` on the params' device
            (:func:`stochastic_rounding_state`) from which the kernel derives
            the call seed where it runs (the same bits as the int; no host
            read), advanced in place between steps. Only the tensor form can
            be captured in a CUDA graph or compiled. Each element's bits are a
            function of (call seed, its param's position in the call, its
            index in the param) only. README "Stochastic rounding".
        plan: a ``fusedopt.functional.StepPlan`` kept by the caller; calls with the
            same tensors reuse its checks and row tables (only grads are re-checked).
        launch: False checks everything and returns a ``PreparedStep`` whose
            ``launch()`` writes (to check several calls before writing any).

    ``has_sparse_grad``, ``foreach`` and ``fused`` are accepted and ignored (always fused).
    """
    h = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    _hyper.check_momentum(h)
    seed = checked_rounding_seed(stochastic_rounding, rounding_seed, master_params)
    if compiling():
        from .. import _ops
        return _ops.compiled_step("sgd", params, d_p_list, dict(momentum_buffer_list=momentum_buffer_list,
                                                                momentum_buffer_ages=momentum_buffer_ages,
                                                                momentum_buffer_absmaxes=momentum_buffer_absmaxes,
                                                                master_params=master_params),
                                  dict(weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                                       nesterov=bool(nesterov), maximize=bool(maximize), state_dtype=state_dtype),
                                  lr, grad_scale, found_inf, rounding_seed=seed)
    columns = momentum_columns(momentum, momentum_buffer_list, momentum_buffer_ages, momentum_buffer_absmaxes) \
        + _master_column(master_params)
    plan = prepare(_SGD, params, d_p_list, columns, labels=Labels(_names), state_dtype=state_dtype,
                   create="momentum_buffer", plan=plan)
    flags = _SGD.flags(nesterov=bool(nesterov), maximize=bool(maximize))
    run = _run_elementwise(plan, lr, grad_scale, found_inf, h, flags, seed)
    return finish(plan, columns, run, launch)


def adam(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
         exp_avg_sqs: List[torch.Tensor], max_exp_avg_sqs: List[torch.Tensor], state_steps: List[torch.Tensor],
         foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
         fused: Optional[bool] = None, grad_scale: Optional[torch.Tensor] = None,
         found_inf: Optional[torch.Tensor] = None, has_complex: bool = False, decoupled_weight_decay: bool = False,
         *, amsgrad: bool, beta1, beta2, lr, weight_decay: float, eps: float, maximize: bool,
         eps_inside_sqrt: bool = False, master_params: Optional[List[Optional[torch.Tensor]]] = None,
         state_dtype: Optional[torch.dtype] = None, absmaxes: Optional[List[torch.Tensor]] = None,
         stochastic_rounding: bool = False, rounding_seed=None, plan: Optional[StepPlan] = None,
         launch: bool = True, _names=None):
    r"""Adam over lists of tensors: ``torch.optim.adam.adam``'s arguments and numbers.

    At step t (each ``state_steps`` entry, a one-element float32 tensor on its
    param's device, is incremented first), for each param p with grad g
    (divided by ``grad_scale`` when given): :math:`g \leftarrow -g` if maximize;
    :math:`g \leftarrow g + \lambda p`, or with ``decoupled_weight_decay``
    :math:`p \leftarrow p(1-\gamma\lambda)`;
    :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`, :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`;
    :math:`\hat v = \max(\hat v_{t-1}, v)` with amsgrad (``max_exp_avg_sqs``), else v;
    :math:`p \leftarrow p - \frac{\gamma}{1-\beta_1^t}\frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}`.
    When ``found_inf`` is nonzero nothing is written (the counters included).

    fusedopt keywords:
        eps_inside_sqrt: the denominator :math:`\sqrt{\hat v/(1-\beta_2^t) + \epsilon}`.
        master_params: fp32 master copies of float16/bfloat16 params (None: none).
        state_dtype: the dtype the moments must have (None: that of ``exp_avgs[0]``,
            float32, bfloat16 or int8; fp64 params keep float64). int8: 8-bit
            blockwise moments (README "8-bit states"): the moment lists hold int8
            codes like the params and ``absmaxes`` their block scales.
        absmaxes: with int8 state, one float32 ``[k, ceil(numel / 256)]`` tensor per
            param: row 0 the block absmax of exp_avg, row 1 of exp_avg_sq, row 2
            (amsgrad) of max_exp_avg_sq.
        stochastic_rounding, rounding_seed, plan, launch: as in :func:`sgd`.

    ``beta1``/``beta2`` may be floats or one-element CPU tensors; ``lr`` a float or
    a one-element tensor (a CUDA tensor is read by the kernel, never by the host).
    ``foreach``, ``capturable``, ``fused`` and ``has_complex`` are accepted and
    ignored; ``differentiable=True`` is rejected.
    """
    if differentiable:
        raise ValueError("fusedopt.functional.adam does not support differentiable=True")
    beta1, beta2 = _hyper.host_float(beta1, "beta1"), _hyper.host_float(beta2, "beta2")
    h = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    _hyper.check_adam(h)
    _hyper.check_betas(beta1, beta2)
    seed = checked_rounding_seed(stochastic_rounding, rounding_seed, master_params)
    if compiling():
        from .. import _ops
        lists = dict(exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps,
                     max_exp_avg_sqs=max_exp_avg_sqs if amsgrad else None, master_params=master_params,
                     absmaxes=absmaxes)
        return _ops.compiled_step("adam", params, grads, lists,
                                  dict(amsgrad=bool(amsgrad), beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                                       eps=eps, maximize=bool(maximize), eps_inside_sqrt=bool(eps_inside_sqrt),
                                       decoupled_weight_decay=bool(decoupled_weight_decay),
                                       state_dtype=state_dtype),
                                  lr, grad_scale, found_inf, rounding_seed=seed)
    columns = [Column("exp_avg", "exp_avgs", STATE, exp_avgs), Column("exp_avg_sq", "exp_avg_sqs", STATE, exp_avg_sqs)]
    if amsgrad:
        columns.append(Column("max_exp_avg_sq", "max_exp_avg_sqs", STATE, max_exp_avg_sqs))
    columns.append(Column("step", "state_steps", STEP, state_steps))
    columns += _master_column(master_params) + absmax_columns(absmaxes, "absmaxes")
    plan = prepare(_ADAM, params, grads, columns, labels=Labels(_names), state_dtype=state_dtype, plan=plan)
    flags = _ADAM.flags(amsgrad=bool(amsgrad), maximize=bool(maximize), decoupled=bool(decoupled_weight_decay),
                        eps_inside_sqrt=bool(eps_inside_sqrt))
    run = _run_elementwise(plan, lr, grad_scale, found_inf, h, flags, seed)
    return finish(plan, columns, run, launch)


def adamw(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
          exp_avg_sqs: List[torch.Tensor], max_exp_avg_sqs: List[torch.Tensor], state_steps: List[torch.Tensor],
          foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
          fused: Optional[bool] = None, grad_scale: Optional[torch.Tensor] = None,
          found_inf: Optional[torch.Tensor] = None, has_complex: bool = False, *, amsgrad: bool, beta1, beta2, lr,
          weight_decay: float, eps: float, maximize: bool, **fusedopt_options):
    """AdamW over lists of tensors: ``torch.optim.adamw.adamw``'s arguments and numbers
    (:func:`adam` with decoupled weight decay: :math:`p \\leftarrow p(1-\\gamma\\lambda)`).
    The fusedopt keywords of :func:`adam` apply."""
    return adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, foreach, capturable,
                differentiable, fused, grad_scale, found_inf, has_complex, True, amsgrad=amsgrad, beta1=beta1,
                beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=maximize, **fusedopt_options)
