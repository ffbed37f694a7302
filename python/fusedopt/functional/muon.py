"""Muon as a function over lists of tensors, with the arguments of
torch.optim._muon.muon (torch 2.13) and its numbers.

A call checks every tensor and hyperparameter, then runs per (device, dtype)
batch of the params (nothing reads back to the host):

1. ``_C.multi_tensor_muon_momentum``: one fused pass over all params of the
   batch: the buffers and each param's update direction, written into its slot
   of the batch's Newton-Schulz workspace (``_kernels/muon.py``);
2. the Frobenius norms of the updates (the deterministic tensor_norms kernel),
   then the Newton-Schulz iteration batched over the matrices of each shape
   (``torch.baddbmm`` in ``ns_dtype``);
3. ``_C.multi_tensor_muon_apply``: decay and the final add, one fused pass.

The per-element math is csrc/ops/muon.h.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import _hyper
from .._dtensor import is_dtensor
from .._kernels import MASTER, STATE, Column, Labels, StepPlan, prepare
from .._kernels import muon as _kmuon
from .._kernels.checks import is_flat_run
from ._step import compiling, device_scalars, finish

_NOT_A_MATRIX = ("Muon orthogonalizes weight matrices; put 0-D and 1-D params (biases, norm weights, scalars) "
                 "in a param group with use_muon=False, which fusedopt.Muon steps with AdamW "
                 "(fusedopt.muon_param_groups(model) builds that split)")


def check_muon_params(params: Sequence[torch.Tensor], labels: Labels) -> None:
    """Every param is a matrix Muon can orthogonalize (see _kernels/muon.py matrix_of)."""
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{labels.param(i)} is a {type(p).__name__}; expected a torch.Tensor")
        if p.dim() < 2:
            raise ValueError(f"{labels.param(i)} has shape {list(p.shape)} ({p.dim()}-D); {_NOT_A_MATRIX}")
        if is_dtensor(p):
            raise NotImplementedError(
                f"{labels.param(i)} is a DTensor (FSDP2 shard); fusedopt.Muon does not yet gather sharded "
                "matrices for Newton-Schulz: step such params with use_muon=False groups, or without FSDP2")
        if p.layout is torch.strided and is_flat_run(p) and _kmuon.matrix_of(p) is None:
            raise ValueError(
                f"{labels.param(i)} has strides {list(p.stride())} for shape {list(p.shape)}: dim 0 is not "
                "outermost in memory, so its memory is not a (shape[0], -1) matrix up to a column permutation; "
                "Muon needs contiguous, channels_last or another layout with dim 0 outermost")


def newton_schulz(ws, coefficients: Sequence[float], steps: int, eps: float) -> None:
    """Orthogonalizes every workspace slot in place, batched per shape: X <- A / max(||A||_F, eps),
    then ``steps`` times X <- a X + (b G + c G^2) X with G = X X^T (X^T X and X (b G + c G^2)
    for a tall X: the transposed iteration torch runs, without a transpose). The result lands
    in each group's ``a`` buffer: the normalization writes into ``b`` when ``steps`` is odd."""
    a, b, c = (float(x) for x in coefficients)
    bf16 = ws.ns_dtype is torch.bfloat16
    for g in ws.groups:
        n = g.norms
        if bf16:  # torch: grad.bfloat16().norm().clamp(min=eps), all bf16
            n = n.to(torch.bfloat16).clamp(min=eps)
            n = n.float() if ws.emulate_bf16 else n
        else:
            n = n.clamp(min=eps)
        n = n.view(-1, 1, 1)
        x, other = (g.b, g.a) if steps % 2 else (g.a, g.b)
        torch.div(g.a, n, out=x)
        rnd = _kmuon.round_bf16_ if ws.emulate_bf16 else (lambda t: None)
        rnd(x)
        wide = g.shape[0] <= g.shape[1]
        for _ in range(steps):
            if wide:
                torch.bmm(x, x.mT, out=g.gram)
            else:
                torch.bmm(x.mT, x, out=g.gram)
            rnd(g.gram)
            torch.baddbmm(g.gram, g.gram, g.gram, beta=b, alpha=c, out=g.gram2)
            rnd(g.gram2)
            if wide:
                torch.baddbmm(x, g.gram2, x, beta=a, out=other)
            else:
                torch.baddbmm(x, x, g.gram2, beta=a, out=other)
            rnd(other)
            x, other = other, x


def muon(params: List[torch.Tensor], grads: List[torch.Tensor], muon_momentum_bufs: List[torch.Tensor], *,
         foreach: Optional[bool] = None, lr, weight_decay: float, momentum: float, nesterov: bool,
         ns_coefficients, ns_steps: int, eps: float, adjust_lr_fn: Optional[str], has_complex: bool = False,
         ns_dtype: torch.dtype = torch.bfloat16, grad_scale: Optional[torch.Tensor] = None,
         found_inf: Optional[torch.Tensor] = None, master_params: Optional[List[Optional[torch.Tensor]]] = None,
         state_dtype: Optional[torch.dtype] = None, plan: Optional[StepPlan] = None, launch: bool = True,
         _names=None):
    r"""Muon over lists of matrices: ``torch.optim._muon.muon``'s arguments and numbers.

    For each param p (a matrix; more than 2 dims: ``p.view(p.shape[0], -1)``) with grad g
    (divided by ``grad_scale`` when given):
    :math:`B \leftarrow B + (1-\mu)(g - B)` (``buf.lerp_(g, 1 - momentum)``; the buffers start
    as zeros, as torch creates them); :math:`U = g + \mu (B - g)` with nesterov, else
    :math:`U = B`; :math:`O = \mathrm{NS}_k^{(a,b,c)}(U / \max(\lVert U\rVert_F, \epsilon))`
    (``ns_steps`` = k quintic Newton-Schulz steps on the wide orientation of the matrix, in
    ``ns_dtype``); :math:`p \leftarrow p (1 - \gamma\lambda) - \gamma\, r(A, B)\, O` with
    :math:`r = \sqrt{\max(1, A/B)}` (adjust_lr_fn None or "original") or
    :math:`0.2\sqrt{\max(A, B)}` ("match_rms_adamw"). When ``found_inf`` is nonzero nothing
    is written.

    fusedopt keywords:
        ns_dtype: dtype of the Newton-Schulz matmuls: torch.bfloat16 (torch's; on CPUs
            computed as fp32 matmuls of bf16 values whose every output is rounded to bf16),
            torch.float32 or torch.float64.
        master_params, state_dtype, plan, launch: as in :func:`fusedopt.functional.sgd`.

    ``foreach`` and ``has_complex`` are accepted and ignored (always fused).
    """
    h = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
             ns_coefficients=ns_coefficients, ns_steps=ns_steps, eps=eps, adjust_lr_fn=adjust_lr_fn,
             ns_dtype=ns_dtype)
    _hyper.check_muon(h)
    labels = Labels(_names)
    check_muon_params(params, labels)
    if compiling():
        from .. import _ops
        return _ops.compiled_step("muon", params, grads, dict(muon_momentum_bufs=muon_momentum_bufs,
                                                              master_params=master_params),
                                  _ops.muon_options(h), lr, grad_scale, found_inf)
    columns = [Column("momentum_buffer", "muon_momentum_bufs", STATE, muon_momentum_bufs)]
    if master_params is not None:
        columns.append(Column("master", "master_params", MASTER, master_params))
    plan = prepare(_kmuon.MUON, params, grads, columns, labels=labels, state_dtype=state_dtype, plan=plan)
    scalars = device_scalars(plan, lr, grad_scale, found_inf)  # checked now, before anything is written
    workspaces = [_kmuon.workspace(b.table, ns_dtype, adjust_lr_fn) for b in plan.batches]

    def run() -> None:
        for b, ws in zip(plan.batches, workspaces):
            s = scalars[b.table.device]
            _kmuon.launch_momentum(b.table, b.state_dtype, s, ws, momentum, nesterov)
            _kmuon.update_norms(b.table, ws)
            newton_schulz(ws, ns_coefficients, ns_steps, eps)
            _kmuon.launch_apply(b.table, b.state_dtype, s, ws, weight_decay)
    return finish(plan, columns, run, launch)
