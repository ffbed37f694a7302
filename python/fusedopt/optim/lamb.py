"""Fused LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes")."""
from __future__ import annotations

from typing import Dict

import torch

from .. import _kernels, _ops
from .adam import check_adam_hyperparameters
from .base import FusedOptimizer, check_float
from .large_batch import NormScaledStep

# csrc/ops/lamb.h LambFlag
_BIAS_CORRECTION, _GRAD_AVERAGING, _TRUST_CLIP, _ALWAYS_ADAPT, _DECOUPLED, _CLIP_GRADS = 1, 2, 4, 8, 16, 32
_MOMENTS_ONLY, _APPLY_ONLY = 64, 128  # internal: a step split around an all-reduce of the norms


class LAMB(NormScaledStep, FusedOptimizer):
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
            ``torch.float32`` (default) or ``torch.bfloat16`` (the math stays fp32;
            the moments are rounded to nearest even when stored). fp64 params keep fp64.

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
    ``fusedopt::large_batch_step`` custom ops (plain params; DTensor params run
    eagerly).

    State per param: ``step`` (fp32 scalar tensor on the param's device),
    ``exp_avg``, ``exp_avg_sq`` (``state_dtype``: fp32 by default, or bf16; fp64 for
    fp64 params); with master weights ``master``. Bytes per param as Adam
    (README "Mixed precision").
    The step count is kept per param as in torch.optim.Adam; it equals the group's
    step count when every param of the group has a grad at every step.
    """

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 grad_averaging=True, max_grad_norm=1.0, trust_clip=False, always_adapt=False,
                 decoupled_decay=False, *, master_weights=False, state_dtype=None):
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, max_grad_norm=max_grad_norm, trust_clip=trust_clip,
                        always_adapt=always_adapt, decoupled_decay=decoupled_decay, master_weights=master_weights,
                        state_dtype=state_dtype)
        self._grad_sq: Dict[torch.device, torch.Tensor] = {}
        super().__init__(params, defaults)

    def check_hyperparameters(self, group, gi):
        check_adam_hyperparameters(group, gi)
        if group["max_grad_norm"] is not None:
            check_float(group, "max_grad_norm", group["max_grad_norm"], low=0.0, low_inclusive=False, gi=gi)
        for key in ("bias_correction", "grad_averaging", "trust_clip", "always_adapt", "decoupled_decay"):
            if not isinstance(group[key], bool):
                raise TypeError(f"param_groups[{gi}]['{key}'] must be a bool; got {group[key]!r}")

    def required_state_keys(self, group):
        return ("exp_avg", "exp_avg_sq")

    def new_state(self, group, p):
        dtype = self.state_dtype(group, p)
        return {
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format),
            "exp_avg_sq": torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format),
        }

    def check_state(self, group, p, st, name):
        super().check_state(group, p, st, name)
        if "step" not in st:
            raise ValueError(f"state of {name} has no 'step'")

    master_column = 6  # csrc/ops/lamb.h kLambMaster

    def state_columns(self, group):
        return {2: "exp_avg", 3: "exp_avg_sq", 4: "step"}  # csrc/ops/lamb.h

    kernel = "lamb"
    split_flags = (_MOMENTS_ONLY, _APPLY_ONLY)  # the apply call advances the step counters

    def kernel_hyper(self, group):
        clip = group["max_grad_norm"] is not None
        flags = ((_BIAS_CORRECTION if group["bias_correction"] else 0)
                 | (_GRAD_AVERAGING if group["grad_averaging"] else 0)
                 | (_TRUST_CLIP if group["trust_clip"] else 0) | (_ALWAYS_ADAPT if group["always_adapt"] else 0)
                 | (_DECOUPLED if group["decoupled_decay"] else 0) | (_CLIP_GRADS if clip else 0))
        beta1, beta2 = (float(b) for b in group["betas"])
        return (beta1, beta2, group["eps"], group["weight_decay"], float(group["max_grad_norm"] or 0.0)), flags

    def before_launch(self, work):
        """Per-tensor grad sums of squares of every grad of every group, per device.
        Under FSDP2 each sum is all-reduced over its shard group first, so the
        clipping norm is that of the full grads."""
        self._grad_sq = {}
        if not any(group["max_grad_norm"] is not None for group, _ in work):
            return
        by_device: Dict[torch.device, list] = {}
        for _, batch in work:
            by_device.setdefault(batch.table.device, []).append(batch)
        local = {}
        for dev, batches in by_device.items():
            tables = [b.table for b in batches]
            out = torch.empty(sum(len(t.params) for t in tables), dtype=torch.float64, device=dev)
            _kernels.grad_sq_norms_into(tables, out)
            if any(b.sharded for b in batches):
                self.reduce_rows_over_shards(out, [p for b in batches for p in b.sources])
            local[dev] = out
        self._grad_sq = self.share_grad_sq(local)

    def compiled_before_launch(self, work):
        if not any(group["max_grad_norm"] is not None for group, _ in work):
            return {}
        by_device: Dict[torch.device, list] = {}
        for _, ps in work:
            by_device.setdefault(ps[0].device, []).extend(p.grad for p in ps)
        return self.share_grad_sq({dev: _ops.grad_sq_norms(gs) for dev, gs in by_device.items()})

    def grad_sq(self, group, device, sums=None):
        if group["max_grad_norm"] is None:
            return None
        return (self._grad_sq if sums is None else sums).get(device)

    @staticmethod
    def share_grad_sq(local: Dict[torch.device, torch.Tensor]) -> Dict[torch.device, torch.Tensor]:
        if len(local) == 1:
            return local
        # every device sees all sums, in one fixed order
        return {dev: torch.cat([t.to(dev, non_blocking=True) for t in local.values()]) for dev in local}
