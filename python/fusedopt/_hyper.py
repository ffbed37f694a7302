"""Hyperparameter checks shared by the functional entries and the optimizer classes.

``where`` names the place in messages: ``"param_groups[0]"`` for an optimizer's
group (``invalid lr in param_groups[0]: nan; ...``), ``""`` for a functional
call (``invalid lr: nan; ...``).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch


def _label(key: str, where: str) -> str:
    return f"{where}['{key}']" if where else key


def check_float(value: Any, key: str, where: str = "", *, low: float = 0.0, low_inclusive: bool = True,
                high: Optional[float] = None, high_inclusive: bool = False) -> None:
    """Raises unless value is a finite number (or one-element tensor) in range.
    A device tensor is checked where a kernel reads it, without a host sync."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{_label(key, where)} must be a number or a one-element tensor")
        if value.device.type != "cpu":
            return
        value = float(value.detach())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{_label(key, where)} must be a number; got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value)  # nan and inf are always rejected
    ok = ok and (value >= low if low_inclusive else value > low)
    if high is not None:
        ok = ok and (value <= high if high_inclusive else value < high)
    if not ok:
        lo = "[" if low_inclusive else "("
        hi = ("]" if high_inclusive else ")") if high is not None else ")"
        in_where = f" in {where}" if where else ""
        raise ValueError(f"invalid {key}{in_where}: {value}; expected a value in "
                         f"{lo}{low}, {high if high is not None else 'inf'}{hi}")


def check_bool(value: Any, key: str, where: str = "") -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{_label(key, where)} must be a bool; got {value!r}")


def check_momentum(h: Mapping[str, Any], where: str = "") -> None:
    """lr, momentum, weight_decay >= 0, finite dampening, nesterov only with momentum
    and no dampening: SGD's rules, shared by LARS."""
    check_float(h["lr"], "lr", where)
    check_float(h["momentum"], "momentum", where)
    check_float(h["dampening"], "dampening", where, low=-float("inf"))
    check_float(h["weight_decay"], "weight_decay", where)
    if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}nesterov momentum requires a momentum and zero dampening")


def check_betas(beta1: Any, beta2: Any, where: str = "") -> None:
    check_float(beta1, "betas[0]", where, high=1.0)
    check_float(beta2, "betas[1]", where, high=1.0)


def check_adam(h: Mapping[str, Any], where: str = "") -> None:
    """lr >= 0, eps > 0, weight_decay >= 0, betas in [0, 1): shared by Adam, AdamW and LAMB."""
    check_float(h["lr"], "lr", where)
    check_float(h["eps"], "eps", where, low=0.0, low_inclusive=False)
    check_float(h["weight_decay"], "weight_decay", where)


def check_lars(h: Mapping[str, Any], where: str = "") -> None:
    for key in ("nesterov", "trust_clip", "always_adapt"):
        check_bool(h[key], key, where)
    check_momentum(h, where)
    check_float(h["trust_coeff"], "trust_coeff", where)
    check_float(h["eps"], "eps", where)


def check_lamb(h: Mapping[str, Any], where: str = "") -> None:
    check_adam(h, where)
    if h["max_grad_norm"] is not None:
        check_float(h["max_grad_norm"], "max_grad_norm", where, low=0.0, low_inclusive=False)
    for key in ("bias_correction", "grad_averaging", "trust_clip", "always_adapt", "decoupled_decay"):
        check_bool(h[key], key, where)


def host_float(value: Any, key: str) -> float:
    """A hyperparameter the host needs as a number (betas): a float, or a CPU
    one-element tensor (read without a device sync)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.device.type != "cpu":
            raise TypeError(f"{key} must be a float or a one-element CPU tensor; got a tensor on {value.device} "
                            f"with {value.numel()} elements (reading it would synchronize with the device)")
        return float(value)
    return float(value)


MUON_ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def check_muon(h: Mapping[str, Any], where: str = "") -> None:
    """torch.optim.Muon's rules (lr, momentum, weight_decay >= 0; adjust_lr_fn None,
    "original" or "match_rms_adamw"; ns_steps < 100), plus: momentum <= 1, eps > 0,
    three finite ns_coefficients, a bool nesterov and ns_dtype bf16/fp32/fp64."""
    check_float(h["lr"], "lr", where)
    check_float(h["weight_decay"], "weight_decay", where)
    check_float(h["momentum"], "momentum", where, high=1.0, high_inclusive=True)
    check_float(h["eps"], "eps", where, low=0.0, low_inclusive=False)
    check_bool(h["nesterov"], "nesterov", where)
    coefficients = h["ns_coefficients"]
    if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
        raise ValueError(f"{_label('ns_coefficients', where)} must be three numbers (a, b, c); got {coefficients!r}")
    for i, value in enumerate(coefficients):
        check_float(value, f"ns_coefficients[{i}]", where, low=-float("inf"))
    steps = h["ns_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"{_label('ns_steps', where)} must be an int; got {type(steps).__name__}")
    if not 0 <= steps < 100:
        in_where = f" in {where}" if where else ""
        raise ValueError(f"invalid ns_steps{in_where}: {steps}; expected an int in [0, 100) "
                         "(torch.optim.Muon refuses 100 or more)")
    if h["adjust_lr_fn"] not in MUON_ADJUST_LR_FNS:
        raise ValueError(f"{_label('adjust_lr_fn', where)} is {h['adjust_lr_fn']!r}; expected None, "
                         "'original' or 'match_rms_adamw'")
    if h["ns_dtype"] not in (torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"{_label('ns_dtype', where)} is {h['ns_dtype']!r}; expected torch.bfloat16, "
                         "torch.float32 or torch.float64")
