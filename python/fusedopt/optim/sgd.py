"""Fused SGD with momentum: a drop-in for torch.optim.SGD."""
from __future__ import annotations

import torch

from .. import _kernels
from .base import FusedOptimizer, check_float

_NESTEROV, _MAXIMIZE = 1, 2  # csrc/ops/sgd.h SgdFlag


def lr_value(group: dict):
    """(float lr, tensor lr or None): a tensor lr is read by the kernel on its device."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.device.type == "cpu":
            return float(lr), None  # a CPU read is no device sync
        return 0.0, lr
    return float(lr), None


def device_lr(lr_tensor, device):
    if lr_tensor is None:
        return None
    return lr_tensor.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())


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
        foreach, fused: accepted for compatibility; fusedopt is always fused.

    One ``_C`` call per (device, dtype) batch of a group per step. State:
    ``momentum_buffer`` (fp32 for 16-bit params, fp64 for fp64), only when
    momentum != 0, as in torch. Under AMP, if a param's very first step is
    skipped (found_inf), its buffer starts from zeros, so the next step uses
    :math:`(1-\tau) g` where torch would use :math:`g` (identical for the usual
    dampening = 0).
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, differentiable=differentiable)
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

    def needs_new_state(self, group, st):
        # No buffer yet (no state, or a checkpoint's momentum_buffer=None from
        # momentum 0): the first momentum step starts it from the update, as
        # torch does. The new state is committed only after all checks pass.
        return not st or (group["momentum"] != 0 and st.get("momentum_buffer") is None)

    def check_state(self, group, p, st, name):
        if self.needs_new_state(group, st):
            return  # a loaded None buffer: completed on the side at the next step
        super().check_state(group, p, st, name)

    def fill_table(self, table, group, states):
        if group["momentum"] != 0:
            bufs = [st["momentum_buffer"] for st in states]
            table.set_column(2, bufs)
            table.check_no_overlap([table.params, bufs])
        else:
            table.check_no_overlap([table.params])
        # A state not (yet) stored was just made by new_state: its buffer is
        # uninitialized and the kernel sets it to the first update.
        first = [self.state.get(p) is not st for p, st in zip(table.params, states)]
        table.set_flag(_kernels.ROW_FIRST_STEP, first)

    def launch(self, table, group, grad_scale, found_inf):
        lr, lr_tensor = lr_value(group)
        flags = (_NESTEROV if group["nesterov"] else 0) | (_MAXIMIZE if group["maximize"] else 0)
        _kernels.multi_tensor_sgd(
            table, self.state_dtype(group, table.params[0]), lr=lr, lr_tensor=device_lr(lr_tensor, table.device),
            momentum=group["momentum"], dampening=group["dampening"], weight_decay=group["weight_decay"],
            flags=flags, grad_scale=grad_scale, found_inf=found_inf)
