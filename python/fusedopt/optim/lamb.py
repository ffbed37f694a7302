"""Fused LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes")."""
from __future__ import annotations

from typing import Dict

import torch

from .. import _hyper, _ops, functional
from .adam import check_adam_group, new_moments
from ..functional.norm_scaled import share_across_devices
from .base import FusedOptimizer


class LAMB(FusedOptimizer):
    r"""LAMB: Adam's direction, scaled per tensor by the ratio of weight norm to update norm.

    At step t of a param group, for each param p with grad g (after AMP unscaling):

    .. math::
        c &= \max\!\Big(\frac{\lVert (g_1, g_2, \dots) \rVert}{\text{max\_grad\_norm}}, 1\Big),
            \quad g \leftarrow g / c \quad\text{(skipped when max\_grad\_norm is None)} \\
        m &\leftarrow \beta_1 m + \beta_3 g \quad (\beta_3 = 1 - \beta_1 \text{ if grad\_averaging else } 1),
            \qquad v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        u &= \frac{m / b_1}{\sqrt{v} / \sqrt{b_2} + \epsilon}, \quad
            b_i = 1 - \beta_i^t \text{ if bias\_correction else } 1 \\
        &\text{if } \lambda \ne 0:\ p \leftarrow p - \gamma\lambda p \text{ (decoupled\_decay)}
            \text{ else } u \leftarrow u + \lambda p \\
        r &= \lVert p\rVert / \lVert u\rVert \ (1 \text{ where either is } 0;\ \min(r, 1) \text{ if trust\_clip});
            \ \text{used if } \lambda \ne 0 \text{ or always\_adapt, else } r = 1 \\
        p &\leftarrow p - \gamma\, r\, u

    The clipping norm is fp64 (exact for fp64 grads; an fp32 or 16-bit grad's sum of
    squares is accumulated in fp32 within a chunk, so fp64 params that share the
    norm with lower-precision grads get a clip factor of fp32 precision).
    The clipping norm covers the grads of all param groups on the device (``p.grad``
    itself is never modified). With params on several devices the per-tensor grad
    norms are copied between devices (asynchronously) so the norm covers all of them.

    Biases and norm weights are usually excluded from decay and adaptation::

        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        opt = fusedopt.LAMB([{"params": decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, weight_decay=0.01)

    Args:
        params: iterable of parameters or dicts defining param groups.
        lr (float or Tensor): :math:`\gamma` (default 1e-3).
        bias_correction (bool): divide by :math:`1-\beta_i^t` (default True).
        betas (tuple): :math:`(\beta_1, \beta_2)` in [0, 1) (default (0.9, 0.999)).
        eps (float): :math:`\epsilon` > 0 (default 1e-6).
        weight_decay (float): :math:`\lambda` (default 0.01).
        grad_averaging (bool): :math:`\beta_3 = 1 - \beta_1` (default True).
        max_grad_norm (float or None): global clipping threshold (default 1.0).
        trust_clip (bool): clip the trust ratio at 1.
        always_adapt (bool): use the trust ratio even where weight_decay is 0.
        decoupled_decay (bool): AdamW-style decay of p instead of adding
            :math:`\lambda p` to u.
        master_weights (bool): keep an fp32 master copy of fp16/bf16 params in
            ``state['master']``; p, p' and the norms come from the master (so the
            trust ratio comes from fp32 weights), the kernel writes it and the
            param rounded to nearest even (ignored for fp32/fp64 params).
        state_dtype (torch.dtype, optional): dtype of ``exp_avg``/``exp_avg_sq``:
            ``torch.float32`` (default), ``torch.bfloat16`` (the math stays fp32;
            the moments are rounded to nearest even when stored) or ``torch.int8``
            (8-bit blockwise moments, int8 codes and ``state['absmax']``, float32
            ``[2, ceil(numel/256)]``; u is formed from them as stored; README "8-bit
            states"). fp64 params keep fp64 (int8 refuses them).
        stochastic_rounding (bool): store fp16/bf16 params rounded up or down at
            random instead of to nearest, so that steps below half an ulp still move
            them on average: no fp32 master copy (excludes master_weights; ignored for
            fp32/fp64 params). README "Stochastic rounding".
        seed (int, optional): seed of the rounding bits (default: ``torch.initial_seed()``),
            kept with the step count in ``group["rounding_state"]`` (device words; in ``state_dict()``).

    Passes over memory per step: (1) when any group clips, read every grad once for
    the per-tensor grad norms (one ``_C`` call per (device, dtype) for all groups);
    then per (device, dtype) batch of a group, in one ``_C`` call, (2) read p, g, m,
    v, write m, v and sum :math:`\lVert p\rVert^2, \lVert u\rVert^2` per tensor (u is
    not stored), (3) read p, m, v, recompute u, write p. A group that does not
    adapt fuses (2) and (3) into one pass. Norms stay on the device; nothing waits
    for the host. fp32 params: 4 + 24 + 16 = 44 bytes per element per step.
    With sharded DTensor params (FSDP2) the per-grad sums of (1) and the norm
    sums of (2) are all-reduced over the shard group, (2) and (3) being two
    calls. Under ``torch.compile`` the step is the ``fusedopt::grad_sq_norms`` and
    ``fusedopt::optimizer_step`` custom ops (plain params; DTensor params run
    eagerly).

    State per param: ``step`` (fp32 scalar tensor on the param's device),
    ``exp_avg``, ``exp_avg_sq`` (``state_dtype``: fp32 by default, or bf16; fp64 for
    fp64 params); with master weights ``master``. Bytes per param as Adam
    (README "Mixed precision").
    The step is :func:`fusedopt.functional.lamb` (the clipping sums of all groups
    from :func:`fusedopt.functional.lamb_clip_sums`).
    The step count is kept per param as in torch.optim.Adam; it equals the group's
    step count when every param of the group has a grad at every step.
    """

    _functional = functional.lamb
    _supports_stochastic_rounding = True
    _quantized_states = (("exp_avg", True), ("exp_avg_sq", False))
    _eager_for_dtensors_when_compiled = True
    _split_steps = False  # private switch (tests): the two-call path of sharded params on plain tensors

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 grad_averaging=True, max_grad_norm=1.0, trust_clip=False, always_adapt=False,
                 decoupled_decay=False, *, master_weights=False, state_dtype=None, stochastic_rounding=False,
                 seed=None):
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, max_grad_norm=max_grad_norm, trust_clip=trust_clip,
                        always_adapt=always_adapt, decoupled_decay=decoupled_decay, master_weights=master_weights,
                        state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, seed=seed)

    def _check_hyperparameters(self, group, where):
        check_adam_group(group, where)
        _hyper.check_lamb(group, where)

    def _required_state_keys(self, group):
        return ("step", "exp_avg", "exp_avg_sq") + (("absmax",) if self._quantized(group) else ())

    def _new_state(self, group, p):
        return new_moments(p, self._state_dtype(group, p), ("exp_avg", "exp_avg_sq"))

    def _state_lists(self, group, states):
        lists = {"exp_avgs": [st["exp_avg"] for st in states], "exp_avg_sqs": [st["exp_avg_sq"] for st in states],
                 "state_steps": [st["step"] for st in states]}
        if self._quantized(group):
            lists["absmaxes"] = [st.get("absmax") for st in states]
        return lists

    def _functional_kwargs(self, group):
        beta1, beta2 = group["betas"]
        kw = dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                  bias_correction=group["bias_correction"], grad_averaging=group["grad_averaging"],
                  max_grad_norm=group["max_grad_norm"], trust_clip=group["trust_clip"],
                  always_adapt=group["always_adapt"], decoupled_decay=group["decoupled_decay"])
        if self._split_steps and not torch.compiler.is_compiling():
            kw["_split"] = True
        return kw

    def _launch(self, prepared):
        """One clipping norm over the grads of every group (per device, all-reduced
        over shard groups under FSDP2), then each group's launch."""
        clipping = [group["max_grad_norm"] is not None for group, _, _ in prepared]
        sums = functional.lamb_clip_sums([call for _, _, call in prepared]) if any(clipping) else None
        for (_, _, call), clips in zip(prepared, clipping):
            call.launch(clip_grad_sq=sums if clips else None)

    def _compiled_extra(self):
        if all(group["max_grad_norm"] is None for group in self.param_groups):
            return lambda group: {}
        by_device: Dict[torch.device, list] = {}  # the norm covers the grads of every group
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_device.setdefault(p.device, []).append(p.grad)
        local = share_across_devices({dev: _ops.grad_sq_norms(gs) for dev, gs in by_device.items()})
        return lambda group: {"clip_grad_sq": local} if group["max_grad_norm"] is not None else {}
