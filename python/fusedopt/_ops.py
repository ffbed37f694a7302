"""The functional entries as torch.library custom ops, for torch.compile.

torch.compile cannot trace into ``_C`` (raw pointers), so a functional entry
called while compiling (``fusedopt.functional.adam`` and the others, directly
or from an optimizer's step) becomes one ``fusedopt::optimizer_step`` op:
dynamo and AOTAutograd see one opaque call that mutates the params and states
in place (``mutates_args``), and its implementation calls the same functional
entry eagerly. Stochastic rounding travels as its device seed words (an int64
tensor the op reads; a host int seed is refused while compiling), so a compiled
step with it needs no graph break. Custom-op schemas have no string lists, so
the names of the state lists and of the options travel as comma-separated strings.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

_KINDS = {"b": bool, "f": float}


def _encode_options(options: Dict[str, object]):
    """('b:amsgrad,f:beta1,n:max_grad_norm', [values]): bools, floats and None by name."""
    names, values = [], []
    for key, value in options.items():
        if isinstance(value, bool):
            names.append("b:" + key)
            values.append(float(value))
        elif value is None:
            names.append("n:" + key)
            values.append(0.0)
        elif isinstance(value, (int, float)):
            names.append("f:" + key)
            values.append(float(value))
        # anything else (state_dtype) is implied by the tensors themselves
    return ",".join(names), values


def _decode_options(names: str, values: Sequence[float]) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for item, value in zip([n for n in names.split(",") if n], values):
        kind, key = item.split(":", 1)
        out[key] = None if kind == "n" else _KINDS[kind](value)
    return out


def compiled_step(name: str, params, grads, lists: Dict[str, Optional[List[torch.Tensor]]],
                  options: Dict[str, object], lr, grad_scale, found_inf, clip_grad_sq=None,
                  rounding_seed: Optional[torch.Tensor] = None) -> None:
    """What a functional entry does while compiling: one custom-op call.
    ``rounding_seed``: the checked seed words of stochastic rounding (None: off)."""
    n = len(params)
    used = {k: v for k, v in lists.items() if v is not None and len(v) > 0}
    for key, lst in used.items():
        if any(t is None for t in lst):
            raise RuntimeError(f"fusedopt.functional.{name} under torch.compile needs every entry of {key}: "
                               "create the state with one eager step first")
        if len(lst) != n:
            raise ValueError(f"{key} has {len(lst)} entries; expected {n}, one per param")
    states = [t for lst in used.values() for t in lst]
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    if lr_tensor is None:
        options = dict(options, lr=float(lr))
    opt_names, opt_values = _encode_options(options)
    if clip_grad_sq is not None and not isinstance(clip_grad_sq, torch.Tensor):
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError("under torch.compile a LAMB call with clip_grad_sq must have its params on one device")
        clip_grad_sq = clip_grad_sq[devices.pop()]
    optimizer_step(name, ",".join(used), list(params), list(grads), states, opt_names, opt_values, lr_tensor,
                   grad_scale, found_inf, clip_grad_sq, rounding_seed)


_MUON_NS_DTYPES = (torch.bfloat16, torch.float32, torch.float64)


def muon_options(h: Dict[str, object]) -> Dict[str, object]:
    """Muon's hyperparameters as the numbers a custom-op schema carries (lr apart):
    the coefficients one by one, adjust_lr_fn and ns_dtype by their index."""
    from ._hyper import MUON_ADJUST_LR_FNS
    a, b, c = h["ns_coefficients"]
    return dict(weight_decay=h["weight_decay"], momentum=h["momentum"], nesterov=bool(h["nesterov"]),
                ns_a=float(a), ns_b=float(b), ns_c=float(c), ns_steps=float(h["ns_steps"]), eps=h["eps"],
                adjust_lr_fn_index=float(MUON_ADJUST_LR_FNS.index(h["adjust_lr_fn"])),
                ns_dtype_index=float(_MUON_NS_DTYPES.index(h["ns_dtype"])))


def _decode_muon(kwargs: Dict[str, object]) -> Dict[str, object]:
    from ._hyper import MUON_ADJUST_LR_FNS
    kwargs["ns_coefficients"] = (kwargs.pop("ns_a"), kwargs.pop("ns_b"), kwargs.pop("ns_c"))
    kwargs["ns_steps"] = int(kwargs["ns_steps"])
    kwargs["adjust_lr_fn"] = MUON_ADJUST_LR_FNS[int(kwargs.pop("adjust_lr_fn_index"))]
    kwargs["ns_dtype"] = _MUON_NS_DTYPES[int(kwargs.pop("ns_dtype_index"))]
    return kwargs


@torch.library.custom_op("fusedopt::optimizer_step", mutates_args=("params", "states"))
def optimizer_step(name: str, state_lists: str, params: List[torch.Tensor], grads: List[torch.Tensor],
                   states: List[torch.Tensor], option_names: str, option_values: List[float],
                   lr_tensor: Optional[torch.Tensor], grad_scale: Optional[torch.Tensor],
                   found_inf: Optional[torch.Tensor], clip_grad_sq: Optional[torch.Tensor],
                   rounding_seed: Optional[torch.Tensor]) -> None:
    from . import functional
    n = len(params)
    keys = [k for k in state_lists.split(",") if k]
    lists = {key: states[k * n:(k + 1) * n] for k, key in enumerate(keys)}
    kwargs = _decode_options(option_names, option_values)
    if lr_tensor is not None:
        kwargs["lr"] = lr_tensor
    if clip_grad_sq is not None:
        kwargs["clip_grad_sq"] = clip_grad_sq
    if rounding_seed is not None:
        kwargs.update(stochastic_rounding=True, rounding_seed=rounding_seed)
    if name == "adam":
        lists.setdefault("max_exp_avg_sqs", [])
    if name in ("sgd", "lars"):
        lists.setdefault("momentum_buffer_list", [None] * n)
    if name == "muon":
        kwargs = _decode_muon(kwargs)
    getattr(functional, name)(params, grads, grad_scale=grad_scale, found_inf=found_inf, **lists, **kwargs)


@optimizer_step.register_fake
def _(name, state_lists, params, grads, states, option_names, option_values, lr_tensor, grad_scale, found_inf,
      clip_grad_sq, rounding_seed) -> None:
    return None


@torch.library.custom_op("fusedopt::grad_sq_norms", mutates_args=())
def grad_sq_norms(grads: List[torch.Tensor]) -> torch.Tensor:
    """``fusedopt.functional.grad_sq_norms`` as an op: LAMB's clipping input under torch.compile."""
    from . import functional
    return functional.grad_sq_norms(grads)


@grad_sq_norms.register_fake
def _(grads):
    return grads[0].new_empty((len(grads),), dtype=torch.float64)
