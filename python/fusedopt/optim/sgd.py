"""Fused SGD with momentum: a drop-in for torch.optim.SGD."""
from __future__ import annotations

import torch

from .. import _kernels
from .base import FusedOptimizer, check_float

_NESTEROV, _MAXIMIZE = 1, 2  # csrc/ops/sgd.h SgdFlag


class SGD(FusedOptimizer):
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
        state_dtype (torch.dtype, optional): ``torch.float32`` (default) or
            ``torch.bfloat16`` for the momentum buffer (fp64 params keep fp64).
        foreach, fused: accepted for compatibility; fusedopt is always fused.

    One ``_C`` call per (device, dtype) batch of a group per step. State:
    ``momentum_buffer`` only when momentum != 0, as in torch. Bytes per param
    (param + grad + buffer [+ master]) with momentum: fp32 params 12 (fp32 buffer)
    or 10 (bf16 buffer); bf16/fp16 params 8 or 6, and 12 or 10 with master_weights.
    Table: README "Mixed precision".
    """

    kernel = "sgd"
    master_column = 3  # csrc/ops/sgd.h kSgdMaster

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, master_weights=False,
                 state_dtype=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, differentiable=differentiable,
                        master_weights=master_weights, state_dtype=state_dtype)
        super().__init__(params, defaults)

    def check_hyperparameters(self, group, gi):
        check_float(group, "lr", group["lr"], gi=gi)
        check_float(group, "momentum", group["momentum"], gi=gi)
        check_float(group, "dampening", group["dampening"], low=-float("inf"), gi=gi)
        check_float(group, "weight_decay", group["weight_decay"], gi=gi)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"param_groups[{gi}]: nesterov momentum requires a momentum and zero dampening")

    def required_state_keys(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def state_key_required_when_loaded(self, group, key):
        return False  # a missing buffer means "first step", as in torch

    def new_state(self, group, p):
        if group["momentum"] == 0:
            return {}
        # The kernel sets buffer = update on a first step. Zeros, not empty: if
        # AMP skips this step (found_inf) the buffer stays defined, and the next
        # step continues from a zero buffer.
        return {"momentum_buffer": torch.zeros_like(p, dtype=self.state_dtype(group, p),
                                                    memory_format=torch.contiguous_format)}

    def missing_state(self, group, p, st):
        # torch saves momentum_buffer=None before the first momentum step.
        if group["momentum"] != 0 and st.get("momentum_buffer") is None:
            return self.new_state(group, p)
        return {}

    def state_columns(self, group):
        return {2: "momentum_buffer"} if group["momentum"] != 0 else {}

    def kernel_hyper(self, group):
        flags = (_NESTEROV if group["nesterov"] else 0) | (_MAXIMIZE if group["maximize"] else 0)
        return (group["momentum"], group["dampening"], group["weight_decay"]), flags

    def check_state(self, group, p, st, name):
        if group["momentum"] != 0 and st.get("momentum_buffer") is None:
            st = {k: v for k, v in st.items() if k != "momentum_buffer"}
            group = dict(group, momentum=0.0)  # missing_state supplies the buffer on the next step
        super().check_state(group, p, st, name)
