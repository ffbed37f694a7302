"""Fused LARS (You, Gitman and Ginsburg 2017, "Large Batch Training of Convolutional Networks")."""
from __future__ import annotations

import torch

from .. import _hyper, functional
from .base import FusedOptimizer
from .sgd import MomentumState


class LARS(MomentumState, FusedOptimizer):
    r"""LARS: SGD whose step is scaled, per tensor, by a trust ratio.

    For each param p with grad g (after AMP unscaling), with :math:`\gamma` = lr,
    :math:`\lambda` = weight_decay, :math:`\eta` = trust_coeff:

    .. math::
        r &= \frac{\eta \lVert p\rVert}{\lVert g\rVert + \lambda\lVert p\rVert + \epsilon}
            \quad (r = 1 \text{ where } \lVert p\rVert = 0 \text{ or } \lVert g\rVert = 0) \\
        r &\leftarrow \min(r / \gamma, 1) \text{ if trust\_clip} \\
        d &= (g + \lambda p)\, r \quad\text{if } \lambda \ne 0 \text{ or always\_adapt, else } d = g \\
        b &\leftarrow d \text{ (first step)},\quad b \leftarrow \mu b + (1 - \tau) d \text{ (later)} \\
        p &\leftarrow p - \gamma\,(d + \mu b \text{ if nesterov else } b) \quad (p - \gamma d \text{ when } \mu = 0)

    Momentum is exactly ``torch.optim.SGD``'s. Biases and norm weights are
    usually left out of the adaptation (and of the decay) by giving them their
    own param group with ``weight_decay=0``::

        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        opt = fusedopt.LARS([{"params": decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=0.1, momentum=0.9, weight_decay=1e-4)

    Args:
        params: iterable of parameters or dicts defining param groups.
        lr (float or Tensor): :math:`\gamma` (default 1.0).
        momentum (float): :math:`\mu` (default 0).
        dampening (float): :math:`\tau` (default 0).
        weight_decay (float): :math:`\lambda` (default 0).
        nesterov (bool): Nesterov momentum (needs momentum > 0 and dampening = 0).
        trust_coeff (float): :math:`\eta` (default 0.001).
        eps (float): :math:`\epsilon` (default 1e-8).
        trust_clip (bool): clip the ratio as :math:`\min(r/\gamma, 1)` (LARC).
        always_adapt (bool): use the trust ratio even where weight_decay is 0.
        master_weights (bool): keep an fp32 master copy of fp16/bf16 params in
            ``state['master']``; the norms and the update read the master (so the
            trust ratio comes from fp32 weights), the kernel writes it and the
            param rounded to nearest even (ignored for fp32/fp64 params).
        state_dtype (torch.dtype, optional): ``torch.float32`` (default),
            ``torch.bfloat16`` (the math stays fp32; the buffer is rounded to
            nearest even when stored) or ``torch.int8`` (8-bit blockwise buffer,
            int8 codes and ``state['absmax']``; README "8-bit states") for the
            momentum buffer. fp64 params keep fp64 (int8 refuses them).
        stochastic_rounding (bool): store fp16/bf16 params rounded up or down at
            random instead of to nearest, so that steps below half an ulp still move
            them on average: no fp32 master copy (excludes master_weights; ignored for
            fp32/fp64 params). README "Stochastic rounding".
        seed (int, optional): seed of the rounding bits (default: ``torch.initial_seed()``),
            kept with the step count in ``group["rounding_state"]`` (device words; in ``state_dict()``).

    Passes over memory per step, per (device, dtype) batch of a group, all in
    one ``_C`` call: (1) read p and g once for the per-tensor norms (skipped
    when the group does not adapt), (2) the update: read p, g, b; write p, b.
    On CUDA the norms stay on the device and each block computes its tensor's
    ratio from them: no host synchronization. The norm sums are deterministic.
    With sharded DTensor params (FSDP2) the two passes are two calls, and the
    local norm sums are all-reduced over the shard group between them. Under
    ``torch.compile`` the step is the ``fusedopt::optimizer_step`` custom op
    (plain params; DTensor params run eagerly). The step is
    :func:`fusedopt.functional.lars`.

    State per param: ``momentum_buffer`` (``state_dtype``: fp32 by default, or bf16;
    fp64 for fp64 params), only when momentum != 0, as in torch.optim.SGD; with
    master weights ``master``. Bytes per param (param + grad + buffer [+ master]):
    as SGD, README "Mixed precision".
    """

    _functional = functional.lars
    _quantized_states = (("momentum_buffer", True),)
    _supports_stochastic_rounding = True
    _eager_for_dtensors_when_compiled = True
    # Private switch (tests): take the two-call path of sharded params on plain
    # tensors too, so that CI covers it without spawning ranks.
    _split_steps = False

    def __init__(self, params, lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 trust_coeff=0.001, eps=1e-8, trust_clip=False, always_adapt=False, *, master_weights=False,
                 state_dtype=None, stochastic_rounding=False, seed=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip,
                        always_adapt=always_adapt, master_weights=master_weights, state_dtype=state_dtype,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, seed=seed)

    def _check_hyperparameters(self, group, where):
        _hyper.check_lars(group, where)

    def _functional_kwargs(self, group):
        kw = dict(momentum=group["momentum"], dampening=group["dampening"], weight_decay=group["weight_decay"],
                  nesterov=group["nesterov"], trust_coeff=group["trust_coeff"], eps=group["eps"],
                  trust_clip=group["trust_clip"], always_adapt=group["always_adapt"])
        if self._split_steps and not torch.compiler.is_compiling():
            kw["_split"] = True
        return kw
