"""The one list of optimizers the tests run, and bitwise snapshots of their state.

Two lists of ``OptimSpec``, built by the same per-class builders below:

- ``OPTIMIZERS``: the settings the hardening suites (test_validation_nothing_lost,
  test_fuzz, test_determinism, test_memory, test_nonfinite) iterate; the names
  say what is on;
- ``TRAINING``: one setting per class (momentum and weight decay on, so the
  LARS/LAMB trust ratios act and LAMB clips), named by the class, for the tests
  that train a model (AMP, compile, schedulers, mixed precision, CUDA,
  distributed, state_dict). ``variant(spec, name, **hyper)`` changes a few
  hyperparameters where a test needs others.

An ``OptimSpec`` holds:

- ``make(params, **hyper)`` builds the fused optimizer;
- ``reference(params, **hyper)`` builds an object with ``step()`` computing the
  same update in plain torch (torch.optim with foreach=False, or for optimizers
  torch lacks a per-tensor fp64 class from tests/reference_optim.py);
- ``hyper``: the setting; ``space``: a hypothesis strategy of valid settings
  (keyword dicts) for the fuzz test;
- ``bad_hyper``: (changes, exception, message regex): settings that must be
  rejected, as a dict of the hyperparameters that change;
- ``state_keys``: the state tensors (same shape as the param) a step creates;
- Muon's Newton-Schulz settings also carry ``matrices`` (shapes the suites that draw
  flat params add) and ``update_rtol`` (the per-step bound of Newton-Schulz below fp64).

To cover a new optimizer, write its builder and add it to both lists.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
from hypothesis import strategies as st

import fusedopt
from reference_optim import RefLAMB, RefLARS, RefMuon
from reference_quant8 import RefAdam8bit, RefAdamW8bit, RefLAMB8bit, RefLARS8bit, RefSGD8bit

NAN, INF = float("nan"), float("inf")


def _invalid(key: str) -> str:
    # check_float's message: "invalid lr in param_groups[0]: nan; expected a value in [0.0, inf)"
    return rf"invalid {key} in param_groups\[\d+\]: .*; expected a value in"


def _must_be_bool(key: str) -> str:
    return rf"param_groups\[\d+\]\['{key}'\] must be a bool"


NESTEROV = r"nesterov momentum requires a momentum and zero dampening"

COMMON_BAD = [
    ({"lr": NAN}, ValueError, _invalid("lr")),
    ({"lr": -1e-3}, ValueError, _invalid("lr")),
    ({"lr": INF}, ValueError, _invalid("lr")),
    ({"lr": "0.1"}, TypeError, r"param_groups\[\d+\]\['lr'\] must be a number"),
    ({"lr": torch.tensor(-1.0)}, ValueError, _invalid("lr")),  # a tensor lr is checked too
    ({"lr": torch.tensor(NAN)}, ValueError, _invalid("lr")),
    ({"weight_decay": NAN}, ValueError, _invalid("weight_decay")),
    ({"weight_decay": -0.1}, ValueError, _invalid("weight_decay")),
    ({"weight_decay": INF}, ValueError, _invalid("weight_decay")),
]

MOMENTUM_BAD = [
    ({"momentum": -0.5}, ValueError, _invalid("momentum")),
    ({"momentum": NAN}, ValueError, _invalid("momentum")),
    ({"dampening": NAN}, ValueError, _invalid("dampening")),
    ({"nesterov": True, "momentum": 0.0}, ValueError, NESTEROV),
    ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, ValueError, NESTEROV),
]

SGD_BAD = COMMON_BAD + MOMENTUM_BAD + [
    ({"dampening": INF}, ValueError, _invalid("dampening")),
]

ADAM_BAD = COMMON_BAD + [
    ({"betas": (1.0, 0.999)}, ValueError, _invalid(r"betas\[0\]")),
    ({"betas": (-0.1, 0.999)}, ValueError, _invalid(r"betas\[0\]")),
    ({"betas": (NAN, 0.999)}, ValueError, _invalid(r"betas\[0\]")),
    ({"betas": (0.9, 1.0)}, ValueError, _invalid(r"betas\[1\]")),
    ({"betas": (0.9, 1.5)}, ValueError, _invalid(r"betas\[1\]")),
    ({"betas": (0.9, -0.5)}, ValueError, _invalid(r"betas\[1\]")),
    ({"betas": (0.9, NAN)}, ValueError, _invalid(r"betas\[1\]")),
    ({"betas": 0.9}, ValueError, r"param_groups\[\d+\]\['betas'\] must be a pair"),
    ({"betas": (0.9,)}, ValueError, r"param_groups\[\d+\]\['betas'\] must be a pair"),
    ({"eps": 0.0}, ValueError, _invalid("eps")),
    ({"eps": -1e-8}, ValueError, _invalid("eps")),
    ({"eps": NAN}, ValueError, _invalid("eps")),
    ({"eps": INF}, ValueError, _invalid("eps")),
]

LARS_BAD = COMMON_BAD + MOMENTUM_BAD + [
    ({"trust_coeff": -1e-3}, ValueError, _invalid("trust_coeff")),
    ({"trust_coeff": NAN}, ValueError, _invalid("trust_coeff")),
    ({"trust_coeff": INF}, ValueError, _invalid("trust_coeff")),
    ({"trust_coeff": None}, TypeError, r"param_groups\[\d+\]\['trust_coeff'\] must be a number"),
    ({"eps": -1e-8}, ValueError, _invalid("eps")),
    ({"eps": NAN}, ValueError, _invalid("eps")),
    ({"eps": INF}, ValueError, _invalid("eps")),
    ({"nesterov": "yes"}, TypeError, _must_be_bool("nesterov")),
    ({"trust_clip": 1}, TypeError, _must_be_bool("trust_clip")),
    ({"trust_clip": "yes"}, TypeError, _must_be_bool("trust_clip")),
    ({"always_adapt": None}, TypeError, _must_be_bool("always_adapt")),
]

LAMB_BAD = ADAM_BAD + [
    ({"max_grad_norm": 0.0}, ValueError, _invalid("max_grad_norm")),
    ({"max_grad_norm": -1.0}, ValueError, _invalid("max_grad_norm")),
    ({"max_grad_norm": NAN}, ValueError, _invalid("max_grad_norm")),
    ({"max_grad_norm": INF}, ValueError, _invalid("max_grad_norm")),
    ({"max_grad_norm": "1"}, TypeError, r"param_groups\[\d+\]\['max_grad_norm'\] must be a number"),
    ({"bias_correction": 1}, TypeError, _must_be_bool("bias_correction")),
    ({"grad_averaging": None}, TypeError, _must_be_bool("grad_averaging")),
    ({"trust_clip": "no"}, TypeError, _must_be_bool("trust_clip")),
    ({"always_adapt": 0}, TypeError, _must_be_bool("always_adapt")),
    ({"decoupled_decay": 1.0}, TypeError, _must_be_bool("decoupled_decay")),
    ({"decoupled_decay": 1}, TypeError, _must_be_bool("decoupled_decay")),
]


MUON_BAD = COMMON_BAD + [
    ({"momentum": -0.5}, ValueError, _invalid("momentum")),
    ({"momentum": 1.5}, ValueError, _invalid("momentum")),
    ({"momentum": NAN}, ValueError, _invalid("momentum")),
    ({"eps": 0.0}, ValueError, _invalid("eps")),
    ({"eps": NAN}, ValueError, _invalid("eps")),
    ({"ns_steps": 100}, ValueError, r"invalid ns_steps in param_groups\[\d+\]: 100"),
    ({"ns_steps": 2.5}, TypeError, r"param_groups\[\d+\]\['ns_steps'\] must be an int"),
    ({"ns_coefficients": (1.0, 2.0)}, ValueError, r"param_groups\[\d+\]\['ns_coefficients'\] must be three"),
    ({"ns_coefficients": (1.0, NAN, 2.0)}, ValueError, _invalid(r"ns_coefficients\[1\]")),
    ({"adjust_lr_fn": "other"}, ValueError, r"param_groups\[\d+\]\['adjust_lr_fn'\] is 'other'"),
    ({"ns_dtype": torch.float16}, ValueError, r"param_groups\[\d+\]\['ns_dtype'\] is torch.float16"),
    ({"nesterov": 1}, TypeError, _must_be_bool("nesterov")),
]

# Muon's AdamW groups: Adam's rules on betas and eps, no amsgrad or maximize.
MUON_ADAMW_BAD = [b for b in ADAM_BAD]

# The classes with stochastic rounding (SGD, Adam, AdamW, LARS, LAMB).
ROUNDING_BAD = [
    ({"stochastic_rounding": 1}, TypeError, _must_be_bool("stochastic_rounding")),
    ({"stochastic_rounding": "yes"}, TypeError, _must_be_bool("stochastic_rounding")),
    ({"stochastic_rounding": True, "master_weights": True}, ValueError,
     r"param_groups\[\d+\]: stochastic_rounding=True and master_weights=True exclude each other"),
]


@dataclass(frozen=True)
class OptimSpec:
    name: str
    make: Callable[..., torch.optim.Optimizer]
    reference: Optional[Callable[..., Any]]
    hyper: Dict[str, Any]
    space: Any  # hypothesis strategy of hyper dicts
    bad_hyper: List[Tuple[Dict[str, Any], type, str]] = field(default_factory=list)
    # State tensors (same shape as the param) a step creates; () = stateless.
    state_keys: Tuple[str, ...] = ()
    # When the keys depend on the param (Muon: matrices keep a momentum buffer, the
    # others AdamW's moments): param -> keys. ``keys_of`` answers for either.
    state_keys_fn: Optional[Callable[[torch.Tensor], Tuple[str, ...]]] = None
    # The param dtypes the setting takes (None: all four); 8-bit state refuses fp64.
    param_dtypes: Optional[Tuple[torch.dtype, ...]] = None
    # Shapes of params that the suites drawing flat (1-D) params add for this setting:
    # Muon's Newton-Schulz path steps only matrices (its 1-D params go to AdamW), so
    # without them those suites would never reach it. () for the others: every
    # element of theirs is updated alike whatever the shape.
    matrices: Tuple[Tuple[int, ...], ...] = ()
    # p, its group's hyperparameters -> the difference from the reference allowed per
    # step on p beyond the suites' rounding bounds, as a fraction of the largest element
    # of the reference's update that step (None: 0): Muon's Newton-Schulz in a lower
    # ns_dtype than its fp64 reference (``muon_update_rtol``).
    update_rtol_fn: Optional[Callable[[torch.Tensor, Dict[str, Any]], float]] = None

    def keys_of(self, p: torch.Tensor) -> Tuple[str, ...]:
        return self.state_keys_fn(p) if self.state_keys_fn is not None else self.state_keys

    def update_rtol(self, p: torch.Tensor, hyper: Optional[Dict[str, Any]] = None) -> float:
        """The extra difference allowed per step on p, a fraction of the reference's largest
        update element (0 for every setting computed at the param's precision)."""
        if self.update_rtol_fn is None:
            return 0.0
        return self.update_rtol_fn(p, {**self.hyper, **(hyper or {})})

    def __repr__(self) -> str:  # short test ids
        return self.name

    @property
    def rounds(self) -> bool:
        """16-bit params are rounded stochastically: each step one of the two neighbours
        of the fp32 result, not the nearest."""
        return bool(self.hyper.get("stochastic_rounding"))

    @property
    def clips(self) -> bool:
        """LAMB with a max_grad_norm: the step also takes the global grad norm."""
        return self.make is fusedopt.LAMB and self.hyper.get("max_grad_norm", 1.0) is not None


def cases(specs, dtypes):
    """pytest.param(spec, dtype) for every pair (fp64 cases compare at fp64 tolerances)."""
    return [pytest.param(s, d, id=f"{s.name}-{str(d).split('.')[-1]}")
            for s in specs for d in dtypes if s.param_dtypes is None or d in s.param_dtypes]


# ---- hypothesis spaces of valid settings --------------------------------------------

def _sgd_space():
    def build(momentum, dampening, nesterov, wd, lr, maximize):
        if nesterov:
            dampening = 0.0
            momentum = momentum or 0.5
        return dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                    weight_decay=wd, maximize=maximize)

    return st.builds(build, st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.0, 0.1, 0.5]), st.booleans(),
                     st.sampled_from([0.0, 1e-4, 0.05]), st.floats(0.0, 0.1), st.booleans())


def _adam_space():
    return st.fixed_dictionaries({
        "lr": st.floats(0.0, 0.1),
        "betas": st.tuples(st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.0, 0.9, 0.999])),
        "eps": st.sampled_from([1e-8, 1e-6, 1e-3]),
        "weight_decay": st.sampled_from([0.0, 1e-4, 0.05]),
        "amsgrad": st.booleans(),
        "maximize": st.booleans(),
    })


def _lars_space():
    # trust_coeff <= 0.1: a step then moves p by at most ~tc * ||p|| (times the momentum
    # gain), so no 3-step case drives a tensor's norm to ~0, where the ratio jumps to 1
    # ("r = 1 where ||p|| = 0"): there fp32 and the fp64 reference can land on opposite sides.
    def build(momentum, dampening, nesterov, wd, lr, trust_coeff, eps, trust_clip, always_adapt):
        if nesterov:
            dampening = 0.0
            momentum = momentum or 0.5
        return dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd,
                    trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, always_adapt=always_adapt)

    return st.builds(build, st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.0, 0.1, 0.5]), st.booleans(),
                     st.sampled_from([0.0, 1e-4, 0.05]), st.floats(0.0, 1.0), st.sampled_from([0.0, 1e-3, 0.02, 0.1]),
                     st.sampled_from([0.0, 1e-8, 1e-3]), st.booleans(), st.booleans())


def _lamb_space():
    return st.fixed_dictionaries({
        "lr": st.floats(0.0, 0.1),
        "betas": st.tuples(st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.0, 0.9, 0.999])),
        "eps": st.sampled_from([1e-8, 1e-6, 1e-3]),
        "weight_decay": st.sampled_from([0.0, 1e-2, 0.1]),
        "bias_correction": st.booleans(),
        "grad_averaging": st.booleans(),
        "max_grad_norm": st.sampled_from([None, 0.5, 1.0, 100.0]),
        "trust_clip": st.booleans(),
        "always_adapt": st.booleans(),
        "decoupled_decay": st.booleans(),
    })


def _muon_space():
    return st.fixed_dictionaries({
        "lr": st.floats(0.0, 0.1),
        "momentum": st.sampled_from([0.0, 0.5, 0.95]),
        "nesterov": st.booleans(),
        "weight_decay": st.sampled_from([0.0, 1e-2, 0.1]),
        "ns_steps": st.sampled_from([0, 1, 5]),
        "adjust_lr_fn": st.sampled_from([None, "match_rms_adamw"]),
        "betas": st.tuples(st.sampled_from([0.0, 0.9]), st.sampled_from([0.0, 0.999])),
        "eps": st.sampled_from([1e-8, 1e-6]),
    })


def _muon_adamw_space():
    return st.fixed_dictionaries({
        "lr": st.floats(0.0, 0.1),
        "betas": st.tuples(st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.0, 0.9, 0.999])),
        "eps": st.sampled_from([1e-8, 1e-6, 1e-3]),
        "weight_decay": st.sampled_from([0.0, 1e-4, 0.05]),
    })


# ---- one builder per class ----------------------------------------------------------

def _rounding(space, hyper):
    """A setting with stochastic rounding keeps it on in every fuzzed setting of its space."""
    if not hyper.get("stochastic_rounding"):
        return space
    return space.map(lambda h: {**h, "stochastic_rounding": True})


def _nearest(reference):
    """The reference of a setting with stochastic rounding: the same step in fp32, which
    the suites round to nearest (the fused 16-bit params are within an ulp a step of it)."""
    def make(params, **hyper):
        hyper.pop("stochastic_rounding", None)
        return reference(params, **hyper)

    return make


def _torch(cls):
    def make(params, **hyper):
        return cls(params, foreach=False, **hyper)

    return make


def sgd(name: str, **hyper) -> OptimSpec:
    keys = ("momentum_buffer",) if hyper.get("momentum") else ()
    return OptimSpec(name, fusedopt.SGD, _nearest(_torch(torch.optim.SGD)), hyper, _rounding(_sgd_space(), hyper),
                     SGD_BAD + ROUNDING_BAD, keys)


def _adam_keys(hyper):
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hyper.get("amsgrad") else ())


def adam(name: str, **hyper) -> OptimSpec:
    return OptimSpec(name, fusedopt.Adam, _nearest(_torch(torch.optim.Adam)), hyper, _rounding(_adam_space(), hyper),
                     ADAM_BAD + ROUNDING_BAD, _adam_keys(hyper))


def adamw(name: str, **hyper) -> OptimSpec:
    return OptimSpec(name, fusedopt.AdamW, _nearest(_torch(torch.optim.AdamW)), hyper, _rounding(_adam_space(), hyper),
                     ADAM_BAD + ROUNDING_BAD, _adam_keys(hyper))


# LARS / LAMB: torch has none; the references are tests/reference_optim.py (fp64 math).
def lars(name: str, **hyper) -> OptimSpec:
    keys = ("momentum_buffer",) if hyper.get("momentum") else ()
    return OptimSpec(name, fusedopt.LARS, _nearest(RefLARS), hyper, _rounding(_lars_space(), hyper), LARS_BAD + ROUNDING_BAD,
                     keys)


def lamb(name: str, **hyper) -> OptimSpec:
    return OptimSpec(name, fusedopt.LAMB, _nearest(RefLAMB), hyper, _rounding(_lamb_space(), hyper), LAMB_BAD + ROUNDING_BAD,
                     ("exp_avg", "exp_avg_sq"))


def split_muon(params, **hyper):
    """fusedopt.Muon over params of any shapes, as a user splits them: in each group (a
    list of params is one group) the matrices (2 or more dims) stay in a Muon group and
    the rest go to a use_muon=False (AdamW) group right after it, with the group's
    hyperparameters; empty parts are left out (a group empty as given stays, as Muon
    part). The suites find a param's group with ``group_index``."""
    params = list(params)
    if not params or not isinstance(params[0], dict):
        params = [{"params": params}]
    lr = hyper.get("lr")
    groups = []
    for given in params:
        ps = list(given["params"])
        rest = {k: v for k, v in given.items() if k != "params"}
        parts = [{**rest, "params": [p for p in ps if p.dim() >= 2]},
                 {**rest, "params": [p for p in ps if p.dim() < 2], "use_muon": False}]
        if isinstance(parts[1].get("lr", lr), torch.Tensor):
            # each group its own lr tensor, as a scheduler changes each in place
            parts[1]["lr"] = parts[1].get("lr", lr).clone()
        groups += [g for g in parts if g["params"]] or parts[:1]
    return fusedopt.Muon(groups, **hyper)


def group_index(opt: torch.optim.Optimizer, p: torch.Tensor) -> Tuple[int, int]:
    """(group, position) of p in opt.param_groups."""
    for gi, g in enumerate(opt.param_groups):
        for i, q in enumerate(g["params"]):
            if q is p:
                return gi, i
    raise KeyError("not a param of this optimizer")


def home_group(opt: torch.optim.Optimizer, p: torch.Tensor) -> int:
    """The group a new param p joins: the first, but for Muon the first that steps p's
    kind (Muon for matrices, AdamW for 0-D and 1-D params, which a Muon group refuses)."""
    if not isinstance(opt, fusedopt.Muon):
        return 0
    want = p.dim() >= 2
    return next((gi for gi, g in enumerate(opt.param_groups) if g["use_muon"] == want), 0)


def muon_adamw(params, **hyper):
    """fusedopt.Muon with every param in its AdamW path (use_muon=False)."""
    return fusedopt.Muon(params, use_muon=False, **hyper)


def _torch_adamw_of_muon(params, **hyper):
    return torch.optim.AdamW(params, foreach=False, **hyper)


# Newton-Schulz in ns_dtype against the fp64 reference, as a fraction of the largest element
# of a step's update: bf16 is tests/test_muon.py's bf16_close bound (2^-3: one bf16 rounding
# that went the other way, amplified by five quintic steps), fp32 ten times its fp32 bound
# (1e-5 there, on other shapes and settings here); fp64 needs none beyond the suites' bounds.
NS_UPDATE_ERROR = {torch.float64: 0.0, torch.float32: 1e-4, torch.bfloat16: 2 ** -3}


def muon_update_rtol(p: torch.Tensor, hyper: Dict[str, Any]) -> float:
    if p.dim() < 2:  # AdamW's params
        return 0.0
    return NS_UPDATE_ERROR[hyper.get("ns_dtype", torch.bfloat16)]


# The matrices the flat-param suites add for Muon: wide, tall, square, a 1 x n row, one
# of more than one of the kernels' 32768-element chunks; conv-like weights (more
# than 2 dims, orthogonalized as (shape[0], -1)) for the "-conv" setting.
MUON_MATRICES = ((24, 40), (40, 24), (17, 17), (1, 19), (96, 513))
MUON_CONV = ((8, 3, 3, 3), (16, 4, 3, 3), (6, 4, 5), (96, 19, 3, 3))


def _with_ns_dtype(space, ns_dtype):
    """A setting's ns_dtype in every fuzzed setting of its space (the reference ignores it)."""
    return space.map(lambda h: {**h, "ns_dtype": ns_dtype})


def muon(name: str, matrices=MUON_MATRICES, **hyper) -> OptimSpec:
    """ns_dtype=float64 by default here: the suites compare against fp64 references at fp32
    tolerances; a lower ns_dtype widens the bound on the matrices by ``muon_update_rtol``
    (tests/test_muon.py compares bf16 and fp32 Newton-Schulz with torch step by step)."""
    hyper = {"ns_dtype": torch.float64, **hyper}
    return OptimSpec(name, split_muon, RefMuon, hyper, _with_ns_dtype(_muon_space(), hyper["ns_dtype"]), MUON_BAD,
                     ("momentum_buffer",), lambda p: ("momentum_buffer",) if p.dim() >= 2 else ("exp_avg", "exp_avg_sq"),
                     matrices=tuple(matrices), update_rtol_fn=muon_update_rtol)


def muon_adamw_spec(name: str, **hyper) -> OptimSpec:
    return OptimSpec(name, muon_adamw, _torch_adamw_of_muon, hyper, _muon_adamw_space(), MUON_ADAMW_BAD,
                     ("exp_avg", "exp_avg_sq"))


# 8-bit states: the reference is tests/reference_quant8.py (the same quantized step,
# bit for bit), and the fuzz space draws the settings with state_dtype=torch.int8.
_NOT_FP64 = (torch.float32, torch.float16, torch.bfloat16)


def _int8(space):
    return space.map(lambda h: {**h, "state_dtype": torch.int8})


def sgd8(name: str, **hyper) -> OptimSpec:
    hyper = {**hyper, "state_dtype": torch.int8}
    return OptimSpec(name, fusedopt.SGD, RefSGD8bit, hyper, _int8(_sgd_space()), SGD_BAD, ("momentum_buffer",),
                     param_dtypes=_NOT_FP64)


def lars8(name: str, **hyper) -> OptimSpec:
    hyper = {**hyper, "state_dtype": torch.int8}
    keys = ("momentum_buffer",) if hyper.get("momentum") else ()
    return OptimSpec(name, fusedopt.LARS, RefLARS8bit, hyper, _int8(_lars_space()), LARS_BAD, keys,
                     param_dtypes=_NOT_FP64)


def lamb8(name: str, **hyper) -> OptimSpec:
    """Without clipping (the space too): with it the reference's clip divisor may round
    differently from the kernels', and a moment one ulp apart can move a code."""
    hyper = {**hyper, "state_dtype": torch.int8, "max_grad_norm": None}
    space = _lamb_space().map(lambda h: {**h, "state_dtype": torch.int8, "max_grad_norm": None})
    return OptimSpec(name, fusedopt.LAMB, RefLAMB8bit, hyper, space, LAMB_BAD, ("exp_avg", "exp_avg_sq"),
                     param_dtypes=_NOT_FP64)


def adam8(name: str, decoupled: bool = False, **hyper) -> OptimSpec:
    hyper = {**hyper, "state_dtype": torch.int8}
    make, ref = (fusedopt.AdamW, RefAdamW8bit) if decoupled else (fusedopt.Adam, RefAdam8bit)
    return OptimSpec(name, make, ref, hyper, _int8(_adam_space()), ADAM_BAD, _adam_keys(hyper),
                     param_dtypes=_NOT_FP64)


_BUILDERS = {split_muon: muon, muon_adamw: muon_adamw_spec, fusedopt.SGD: sgd, fusedopt.Adam: adam, fusedopt.AdamW: adamw, fusedopt.LARS: lars,
             fusedopt.LAMB: lamb}


def variant(spec: OptimSpec, name: str, **hyper) -> OptimSpec:
    """spec's optimizer under another name with some hyperparameters changed."""
    extra = {"matrices": spec.matrices} if spec.make is split_muon else {}
    return _BUILDERS[spec.make](name, **extra, **{**spec.hyper, **hyper})


OPTIMIZERS: List[OptimSpec] = [
    sgd("SGD", lr=0.05),
    sgd("SGD-momentum", lr=0.05, momentum=0.9, weight_decay=1e-3),
    adam("Adam", lr=1e-2, weight_decay=1e-3),
    adam("Adam-amsgrad", lr=1e-2, amsgrad=True),
    adamw("AdamW", lr=1e-2, weight_decay=0.05),
    lars("LARS", lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
    lars("LARS-clip-nomomentum", lr=0.5, trust_coeff=0.02, trust_clip=True, always_adapt=True),
    lamb("LAMB", lr=1e-2, weight_decay=0.05),
    lamb("LAMB-decoupled-noclip", lr=1e-2, weight_decay=0.05, max_grad_norm=None, decoupled_decay=True,
         trust_clip=True, bias_correction=False),
    muon_adamw_spec("Muon-adamw", lr=1e-2, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-8),
    # Muon's Newton-Schulz path (matrices; 1-D params go to an AdamW group, split_muon):
    # fp64 Newton-Schulz (the reference's precision), fp32 with the other options, the
    # default bf16, and conv-like weights.
    muon("Muon-ns-fp64", lr=0.02, weight_decay=0.05, momentum=0.9, eps=1e-8, betas=(0.9, 0.95)),
    muon("Muon-ns-fp32-nonesterov-rms", ns_dtype=torch.float32, lr=0.02, weight_decay=0.1, momentum=0.95,
         nesterov=False, adjust_lr_fn="match_rms_adamw"),
    muon("Muon-ns-bf16", ns_dtype=torch.bfloat16, lr=0.02, weight_decay=0.05),
    muon("Muon-ns-fp32-conv", MUON_CONV, ns_dtype=torch.float32, lr=0.02, weight_decay=0.05, momentum=0.9),
    sgd8("SGD-momentum-int8", lr=0.05, momentum=0.9, weight_decay=1e-3),
    adam8("Adam-int8", lr=1e-2, weight_decay=1e-3),
    adam8("AdamW-int8-amsgrad", decoupled=True, lr=1e-2, weight_decay=0.05, amsgrad=True),
    lars8("LARS-int8", lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
    lamb8("LAMB-int8", lr=1e-2, weight_decay=0.05, trust_clip=True),
    # Stochastic rounding: 16-bit params rounded at random (fp32/fp64 params, most of the
    # suites' cases, ignore it); ``rounds`` tells the suites that compare 16-bit params with a
    # round-to-nearest reference to allow one ulp per step.
    sgd("SGD-sr", lr=0.05, momentum=0.9, stochastic_rounding=True),
    adam("Adam-sr", lr=1e-2, weight_decay=1e-3, stochastic_rounding=True),
    adamw("AdamW-sr", lr=1e-2, weight_decay=0.05, stochastic_rounding=True),
    lars("LARS-sr", lr=0.1, momentum=0.9, weight_decay=1e-3, stochastic_rounding=True),
    lamb("LAMB-sr", lr=1e-2, weight_decay=0.05, stochastic_rounding=True),
]

BY_NAME = {s.name: s for s in OPTIMIZERS}

TRAINING: List[OptimSpec] = [
    sgd("SGD", lr=0.05, momentum=0.9, weight_decay=1e-3),
    adam("Adam", lr=1e-2, weight_decay=1e-3),
    adamw("AdamW", lr=1e-2, weight_decay=1e-2),
    lars("LARS", lr=0.1, momentum=0.9, weight_decay=1e-3, trust_coeff=0.02),
    # max_grad_norm well below the grad norms of the tiny models: clipping is active.
    lamb("LAMB", lr=1e-2, weight_decay=0.05, max_grad_norm=0.5),
    muon("Muon", lr=0.02, weight_decay=0.05, momentum=0.9, eps=1e-8, betas=(0.9, 0.95)),
]

TRAINING_BY_CLASS = {s.make: s for s in TRAINING}
TRAINING_BY_CLASS[fusedopt.Muon] = TRAINING_BY_CLASS[split_muon]


# ---- bitwise snapshots --------------------------------------------------------

def tensor_bits(t: Optional[torch.Tensor]):
    """Everything that identifies t's contents, compared bit for bit (NaN-safe)."""
    if t is None:
        return None
    t = t.detach()
    if t.layout is not torch.strided:
        t = t.to_dense()
    if t.device.type == "meta":
        return ("meta", tuple(t.shape), str(t.dtype))
    flat = t.reshape(-1).contiguous()
    raw = flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
    return (tuple(t.shape), str(t.dtype), str(t.device), bytes(raw.cpu().numpy().tobytes()))


def value_bits(v):
    if isinstance(v, torch.Tensor):
        return tensor_bits(v)
    if isinstance(v, float) and math.isnan(v):
        return ("nan",)
    if isinstance(v, (list, tuple)):
        return tuple(value_bits(x) for x in v)
    if isinstance(v, dict):
        return {k: value_bits(x) for k, x in v.items()}
    return v


def snapshot(opt: torch.optim.Optimizer) -> dict:
    """Params, grads, per-param state and hyperparameters of ``opt``, as bits."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {
        "params": [tensor_bits(p) for p in params],
        "grads": [tensor_bits(p.grad) for p in params],
        "state": [value_bits(dict(opt.state[p])) if p in opt.state else None for p in params],
        "groups": [value_bits({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups],
    }


def state_dict_bits(opt: torch.optim.Optimizer) -> dict:
    return value_bits(opt.state_dict())
