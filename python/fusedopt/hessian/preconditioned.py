"""The curvature an optimizer sees: its preconditioned Hessian and its stability threshold.

An adaptive method steps along ``P^-1 g`` with a diagonal P, so on a quadratic it is stable
while the largest eigenvalue of ``P^-1 H`` stays below a threshold set by its learning rate
and momentum (Cohen et al. 2021, "Gradient descent on neural networks typically occurs at the
edge of stability"; Cohen et al. 2022, "Adaptive gradient methods at the edge of stability").
:func:`preconditioned` is the symmetric operator ``P^-1/2 H P^-1/2`` (the eigenvalues of
``P^-1 H``) for a fusedopt optimizer's current state; :func:`stability_threshold` the
threshold its hyperparameters give.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import optim
from .operator import apply_block

_ADAPTIVE = (optim.Adam, optim.LAMB)  # AdamW is an Adam subclass
_MOMENTUM = (optim.SGD, optim.LARS)


class PreconditionedOperator:
    """``x -> d * H(d * x)`` with ``d = P^-1/2`` (one value per coordinate of ``op``): symmetric,
    with the eigenvalues of ``P^-1 H``. ``num_matvecs`` counts the products of ``op``."""

    def __init__(self, op, inv_sqrt_p: torch.Tensor):
        self.op = op
        self.d = inv_sqrt_p
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device

    @property
    def num_matvecs(self) -> int:
        return self.op.num_matvecs

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        d = self.d.to(device=x.device, dtype=x.dtype)
        return d * self.op.matvec(d * x).to(x.dtype)

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        """The columns' products in one block product of the wrapped operator (or its loop)."""
        d = self.d.to(device=X.device, dtype=X.dtype)[:, None]
        return d * apply_block(self.op, d * X)


def _group_of(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> Optional[dict]:
    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            return group
    return None


def _diagonal(optimizer, p: torch.Tensor, group: dict, i: int) -> torch.Tensor:
    """P for one param: sqrt(v_hat) + eps (sqrt(v_hat + eps) with eps_inside_sqrt), as the step uses."""
    st = optimizer.state.get(p) or {}
    if st.get("exp_avg_sq") is None or st.get("step") is None or float(st["step"]) < 1:
        raise ValueError(f"op.params[{i}] has no second moment in the optimizer's state yet (no step taken): "
                         "P = diag(sqrt(v_hat) + eps) needs at least one step")
    v = st["exp_avg_sq"]
    if group.get("amsgrad") and st.get("max_exp_avg_sq") is not None:
        v = st["max_exp_avg_sq"]
    v = v.detach().to(torch.float64)
    t = float(st["step"])
    beta2, eps = float(group["betas"][1]), float(group["eps"])
    bias = 1.0 - beta2 ** t if group.get("bias_correction", True) else 1.0
    v_hat = v / bias
    return torch.sqrt(v_hat + eps) if group.get("eps_inside_sqrt") else torch.sqrt(v_hat) + eps


def preconditioned(op, optimizer: torch.optim.Optimizer) -> PreconditionedOperator:
    """The operator ``P^-1/2 H P^-1/2`` of ``op`` (a :class:`HessianOperator` or any operator
    with ``.params``, the tensors whose flattened concatenation are its coordinates) for the
    diagonal preconditioner of ``optimizer``'s current state, taken now (later steps do not
    change it):

    - :class:`fusedopt.Adam`, :class:`fusedopt.AdamW`: ``P = diag(sqrt(v_hat) + eps)``,
      ``v_hat = exp_avg_sq / (1 - beta2^t)`` (``max_exp_avg_sq`` with amsgrad; ``sqrt(v_hat + eps)``
      with ``eps_inside_sqrt``), exactly the denominator of the step;
    - :class:`fusedopt.LAMB`: the same (its per-tensor trust ratios are left out);
    - :class:`fusedopt.SGD`, :class:`fusedopt.LARS`: the identity (``op`` itself, wrapped).

    Everything is checked before any product: every param of ``op`` must be in the optimizer,
    and an adaptive optimizer must have stepped. Raises TypeError/ValueError naming what is wrong.
    """
    params = getattr(op, "params", None)
    if params is None:
        raise TypeError("op must have .params (the tensors of its coordinates), as HessianOperator has")
    if not isinstance(optimizer, (*_ADAPTIVE, *_MOMENTUM)):
        raise TypeError(f"optimizer must be a fusedopt SGD, Adam, AdamW, LARS or LAMB; got {type(optimizer).__name__}")
    groups = []
    for i, p in enumerate(params):
        group = _group_of(optimizer, p)
        if group is None:
            raise ValueError(f"op.params[{i}] (shape {list(p.shape)}) is not a parameter of the optimizer")
        groups.append(group)
    n = op.shape[0]
    if not isinstance(optimizer, _ADAPTIVE):
        return PreconditionedOperator(op, torch.ones(n, dtype=torch.float64, device=op.device))
    parts: List[torch.Tensor] = [_diagonal(optimizer, p, g, i).reshape(-1).to(op.device)
                                 for i, (p, g) in enumerate(zip(params, groups))]
    diag = torch.cat(parts)
    if diag.numel() != n:
        raise ValueError(f"op.params hold {diag.numel()} elements; op.shape is {op.shape}")
    return PreconditionedOperator(op, diag.rsqrt())


def stability_threshold(optimizer: torch.optim.Optimizer, group: Optional[int] = None) -> float:
    """The largest eigenvalue of the (preconditioned) Hessian below which the optimizer's
    step is stable on a quadratic, from one param group's hyperparameters:

    - SGD without momentum: ``2 / lr``;
    - SGD with heavy-ball momentum mu and dampening tau: ``2 (1 + mu) / ((1 - tau) lr)``;
      with Nesterov (tau = 0): ``2 (1 + mu) / ((1 + 2 mu) lr)`` (both from the linear recursion
      of torch.optim.SGD's update on ``x -> lambda x``; ``tests/test_preconditioned.py``
      simulates it);
    - Adam/AdamW: ``(2 + 2 beta1) / ((1 - beta1) lr)`` for ``P^-1 H`` (Cohen et al. 2022),
      bias corrections taken as 1 (late in training).

    Weight decay is left out (it adds its coefficient to the Hessian's eigenvalues). ``group``:
    the param group (needed when groups differ in these hyperparameters)."""
    groups = optimizer.param_groups
    keys = ("lr", "momentum", "dampening", "nesterov", "betas")
    if group is None:
        settings = {tuple(float(g[k]) if isinstance(g.get(k), (int, float)) else str(g.get(k)) for k in keys)
                    for g in groups}
        if len(settings) > 1:
            raise ValueError("the param groups differ in lr, momentum or betas: pass group=<index>")
        group = 0
    if not 0 <= group < len(groups):
        raise ValueError(f"group must be in [0, {len(groups)}); got {group}")
    g = groups[group]
    lr = float(g["lr"])
    if not lr > 0:
        raise ValueError(f"param_groups[{group}]['lr'] is {lr}; a threshold needs lr > 0")
    if isinstance(optimizer, optim.Adam):
        beta1 = float(g["betas"][0])
        return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
    if isinstance(optimizer, optim.SGD):
        mu, tau = float(g["momentum"]), float(g["dampening"])
        if mu == 0:
            return 2.0 / lr
        if g["nesterov"]:
            return 2.0 * (1.0 + mu) / ((1.0 + 2.0 * mu) * lr)
        if tau >= 1.0:  # the buffer never takes a grad after the first step: no threshold
            return float("inf")
        return 2.0 * (1.0 + mu) / ((1.0 - tau) * lr)
    raise TypeError(f"stability_threshold knows SGD, Adam and AdamW; got {type(optimizer).__name__} "
                    "(LARS and LAMB scale each tensor's step by a trust ratio that depends on the weights)")
