"""Fused Adam and AdamW: drop-ins for torch.optim.Adam and torch.optim.AdamW."""
from __future__ import annotations

import torch

from .. import _hyper, functional
from .base import FusedOptimizer


def check_adam_group(group: dict, where: str) -> None:
    """Adam's hyperparameter rules with betas given as a pair: shared by Adam and LAMB."""
    _hyper.check_adam(group, where)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}['betas'] must be a pair (beta1, beta2); got {betas!r}")
    _hyper.check_betas(betas[0], betas[1], where)


def new_moments(p: torch.Tensor, dtype: torch.dtype, keys) -> dict:
    """A step counter and zero moments like p (DTensor params get DTensor states);
    8-bit moments (dtype torch.int8): zero int8 codes like p and their block scales,
    ``absmax`` (README "8-bit states")."""
    st = {"step": torch.zeros((), dtype=torch.float32, device=p.device)}
    for key in keys:
        st[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    if dtype is torch.int8:
        from .._kernels.quant8 import new_absmax
        st["absmax"] = new_absmax(p, len(keys))
    return st


class Adam(FusedOptimizer):
    r"""Adam, the same arguments, numbers and state_dict as ``torch.optim.Adam``.

    For each param p with grad g (after AMP unscaling), at step t:

    .. math::
        g &\leftarrow -g \text{ if maximize} \\
        g &\leftarrow g + \lambda p \quad\text{(Adam, } \lambda \ne 0\text{)};\qquad
        p \leftarrow p(1 - \gamma\lambda) \quad\text{(AdamW / decoupled\_weight\_decay)} \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \hat v &= \max(\hat v_{t-1}, v) \text{ if amsgrad else } v \\
        p &\leftarrow p - \frac{\gamma}{1-\beta_1^t}\, \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}
        \quad\text{or, with eps\_inside\_sqrt, } \frac{m}{\sqrt{\hat v/(1-\beta_2^t) + \epsilon}}

    Args:
        params: iterable of parameters or dicts defining param groups.
        lr (float or Tensor): :math:`\gamma` (default 1e-3).
        betas (tuple): :math:`(\beta_1, \beta_2)`, each in [0, 1) (default (0.9, 0.999)).
        eps (float): :math:`\epsilon` > 0 (default 1e-8).
        weight_decay (float): :math:`\lambda` (default 0).
        amsgrad (bool): keep the running maximum of v (state ``max_exp_avg_sq``).
        maximize (bool): maximize the objective.
        decoupled_weight_decay (bool): AdamW-style decay (as in torch.optim.Adam).
        eps_inside_sqrt (bool): the denominator :math:`\sqrt{\hat v_{corr} + \epsilon}` of the
            course notes instead of torch's :math:`\sqrt{\hat v_{corr}} + \epsilon` (default False).
        master_weights (bool): keep an fp32 master copy of fp16/bf16 params in
            ``state['master']``; the kernel reads and updates the master and writes
            the param rounded to nearest even (ignored for fp32/fp64 params).
        state_dtype (torch.dtype, optional): dtype of ``exp_avg``/``exp_avg_sq``/
            ``max_exp_avg_sq``: ``torch.float32`` (default), ``torch.bfloat16``
            (the math stays fp32; states are rounded to nearest even when stored)
            or ``torch.int8``: 8-bit blockwise moments, int8 codes plus
            ``state['absmax']`` (float32 ``[k, ceil(numel/256)]``), decoded and
            encoded around the same fp32 math in one pass (README "8-bit states";
            ``fusedopt.dequantized_state_dict`` for torch.optim checkpoints).
            fp64 params always keep fp64 state (int8 refuses them).
        stochastic_rounding (bool): store fp16/bf16 params rounded up or down at
            random instead of to nearest, so that steps below half an ulp still move
            them on average: no fp32 master copy (excludes master_weights; ignored for
            fp32/fp64 params). README "Stochastic rounding".
        seed (int, optional): seed of the rounding bits (default: ``torch.initial_seed()``),
            kept with the step count in ``group["rounding_state"]`` (device words; in ``state_dict()``).
        foreach, fused: accepted for compatibility.
        capturable: accepted; every fusedopt step is CUDA-graph capturable once
            the state exists (see README "CUDA graphs").

    State per param: ``step`` (fp32 scalar tensor on the param's device), ``exp_avg``,
    ``exp_avg_sq``, with amsgrad ``max_exp_avg_sq`` and with master weights ``master``.

    Bytes per parameter (param + grad + moments [+ master]), without amsgrad:
    fp32 params 16 (fp32 moments), 12 (bf16 moments) or 10.03 (8-bit moments and
    their scales); bf16/fp16 params 12, 8 or 6.03, and 4 more with master_weights.
    amsgrad adds one more state (4, 2 or 1.02 bytes). Each byte is read and written
    once per step (the grad read only).
    Table: README "Mixed precision".

    Each step is one ``_C`` call per (device, dtype) batch of a group; on CUDA the
    step counters live on the device, so step() never waits for the GPU.
    """

    _functional = functional.adam
    _decoupled_default = False
    _quantized_states = (("exp_avg", True), ("exp_avg_sq", False), ("max_exp_avg_sq", False))
    _supports_stochastic_rounding = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=None, eps_inside_sqrt=False, master_weights=False, state_dtype=None,
                 stochastic_rounding=False, seed=None):
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled_default
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, capturable=capturable, differentiable=differentiable,
                        decoupled_weight_decay=decoupled_weight_decay, eps_inside_sqrt=eps_inside_sqrt,
                        master_weights=master_weights, state_dtype=state_dtype,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, seed=seed)

    def _check_hyperparameters(self, group, where):
        check_adam_group(group, where)

    def _moment_keys(self, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def _required_state_keys(self, group):
        return ("step",) + self._moment_keys(group) + (("absmax",) if self._quantized(group) else ())

    def _new_state(self, group, p):
        return new_moments(p, self._state_dtype(group, p), self._moment_keys(group))

    def _state_lists(self, group, states):
        lists = {"exp_avgs": [st["exp_avg"] for st in states], "exp_avg_sqs": [st["exp_avg_sq"] for st in states],
                 "state_steps": [st["step"] for st in states], "max_exp_avg_sqs": []}
        if group["amsgrad"]:
            lists["max_exp_avg_sqs"] = [st["max_exp_avg_sq"] for st in states]
        if self._quantized(group):
            lists["absmaxes"] = [st.get("absmax") for st in states]
        return lists

    def _functional_kwargs(self, group):
        beta1, beta2 = group["betas"]
        return dict(amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                    eps=group["eps"], maximize=group["maximize"],
                    decoupled_weight_decay=group["decoupled_weight_decay"],
                    eps_inside_sqrt=group["eps_inside_sqrt"])


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (default weight_decay=1e-2), as ``torch.optim.AdamW``.
    The fusedopt keywords (master_weights, state_dtype, stochastic_rounding, seed) are Adam's."""

    _decoupled_default = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 eps_inside_sqrt=False, master_weights=False, state_dtype=None, stochastic_rounding=False,
                 seed=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, capturable=capturable,
                         differentiable=differentiable, decoupled_weight_decay=True,
                         eps_inside_sqrt=eps_inside_sqrt, master_weights=master_weights, state_dtype=state_dtype,
                         stochastic_rounding=stochastic_rounding, seed=seed)
