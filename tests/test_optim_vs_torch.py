"""fusedopt.SGD / Adam / AdamW against torch.optim (foreach=False), step by step.

Every test draws fresh random hyperparameters, shapes and grads from its seed
(printed; FUSEDOPT_TEST_SEED replays one). Shapes include 0-d, empty, odd sizes,
sizes that are not multiples of 4 or 8, and params that are views at a storage
offset (so their data is not 16-byte aligned). Params are split into several
param groups with their own options, and some params have no grad on some steps.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import fusedopt
from fusedopt import _kernels
from optim_registry import TRAINING_BY_CLASS

STEPS = 50
SHAPES = [(), (0,), (1,), (3,), (7,), (13, 5), (3, 0, 2), (9, 11), (1023,), (33, 17), (2, 3, 5, 7), (4099,)]
OFFSETS = [0, 1, 3, 5]  # elements before the view's first element in its storage


# ---- building params ------------------------------------------------------------------------
def offset_view(values: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous tensor equal to `values` that starts `offset` elements into a larger storage."""
    storage = torch.full((values.numel() + offset + 2,), float("nan"), dtype=values.dtype)
    view = storage[offset:offset + values.numel()].view(values.shape)
    view.copy_(values)
    return view


def make_pairs(rng: random.Random, dtype: torch.dtype, ref_dtype: torch.dtype):
    """(fused params, reference params): equal values, fused ones sometimes at odd storage offsets."""
    fused, ref = [], []
    for shape in SHAPES:
        values = (torch.randn(shape, dtype=torch.float64) * rng.choice([0.1, 1.0, 3.0])).to(dtype)
        fused.append(offset_view(values, rng.choice(OFFSETS)))
        ref.append(values.to(ref_dtype).clone())
    return fused, ref


def split_groups(rng: random.Random, n: int, n_groups: int):
    idx = list(range(n))
    rng.shuffle(idx)
    cuts = sorted(rng.sample(range(1, n), n_groups - 1))
    return [sorted(idx[a:b]) for a, b in zip([0] + cuts, cuts + [n])]


def set_grads(rng: random.Random, fused, ref, step: int, dtype: torch.dtype) -> None:
    """Fresh grads on both sides; about one param in five has none.

    Magnitudes keep params O(1) over the run: torch's vectorized CPU kernels use
    fused multiply-add in places (fusedopt never contracts), so the two differ by
    an ulp per step, and with params of size ~20 that alone exceeds atol 1e-6.
    """
    for i, (pf, pr) in enumerate(zip(fused, ref)):
        if step > 0 and rng.random() < 0.2:
            pf.grad, pr.grad = None, None
            continue
        g = (torch.randn(pf.shape, dtype=torch.float64) * rng.choice([1e-3, 0.1, 1.0])).to(dtype)
        pf.grad = offset_view(g, rng.choice(OFFSETS))  # grads may be unaligned too
        pr.grad = g.to(pr.dtype).clone()


# ---- random hyperparameters ------------------------------------------------------------------
def sgd_options(rng: random.Random) -> dict:
    momentum = rng.choice([0.0, rng.uniform(0.5, 0.95)])
    nesterov = momentum > 0 and rng.random() < 0.5
    return dict(lr=10 ** rng.uniform(-3, -1.5), momentum=momentum,
                dampening=0.0 if nesterov else rng.choice([0.0, rng.uniform(0.0, 0.5)]),
                weight_decay=rng.choice([0.0, rng.uniform(0.0, 0.1)]), nesterov=nesterov,
                maximize=rng.random() < 0.5)


def adam_options(rng: random.Random, decoupled_choice: bool = True) -> dict:
    opts = dict(lr=10 ** rng.uniform(-4, -2),
                betas=(rng.choice([0.0, rng.uniform(0.5, 0.95)]), rng.uniform(0.9, 0.9999)),
                eps=rng.choice([1e-8, 10 ** rng.uniform(-6, -3)]),
                weight_decay=rng.choice([0.0, rng.uniform(0.0, 0.1)]),
                amsgrad=rng.random() < 0.5, maximize=rng.random() < 0.5)
    if decoupled_choice:
        opts["decoupled_weight_decay"] = rng.random() < 0.5
    return opts


# The registry's optimizer (spec.make) and its torch.optim reference (spec.reference,
# foreach=False); the hyperparameters are drawn per group; the state keys compared.
OPTIMIZERS = {
    "SGD": (TRAINING_BY_CLASS[fusedopt.SGD], sgd_options, ("momentum_buffer",)),
    "Adam": (TRAINING_BY_CLASS[fusedopt.Adam], adam_options, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    "AdamW": (TRAINING_BY_CLASS[fusedopt.AdamW], lambda r: adam_options(r, decoupled_choice=False),
              ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
}


def build(name: str, rng: random.Random, fused, ref, n_groups: int = 3):
    spec, draw, _ = OPTIMIZERS[name]
    groups = split_groups(rng, len(fused), n_groups)
    options = [draw(rng) for _ in groups]
    opt_f = spec.make([dict(params=[fused[i] for i in g], **o) for g, o in zip(groups, options)])
    opt_r = spec.reference([dict(params=[ref[i] for i in g], **o) for g, o in zip(groups, options)])
    return opt_f, opt_r, options


# ---- comparisons -----------------------------------------------------------------------------
def assert_close_every(fused, ref, step, options, rtol, atol):
    for i, (pf, pr) in enumerate(zip(fused, ref)):
        try:
            torch.testing.assert_close(pf, pr, rtol=rtol, atol=atol)
        except AssertionError as e:
            raise AssertionError(f"param {i} shape {list(pf.shape)} differs at step {step + 1}; "
                                 f"options {options}\n{e}") from None


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |x| (x in fp32/fp64)."""
    fi = torch.finfo(dtype)
    mag = x.abs().clamp_min(fi.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * fi.eps


def assert_within_ulps(fused, ref, dtype, step, options, ulps=2):
    for i, (pf, pr) in enumerate(zip(fused, ref)):
        a, b = pf.double(), pr.double()
        tol = ulps * ulp(torch.maximum(a.abs(), b.abs()), dtype)
        bad = (a - b).abs() > tol
        if bad.any():
            j = int(bad.flatten().nonzero()[0])
            raise AssertionError(f"{dtype} param {i} shape {list(pf.shape)} step {step + 1}: element {j} "
                                 f"{a.flatten()[j].item()} vs reference {b.flatten()[j].item()} "
                                 f"(more than {ulps} ulp); {int(bad.sum())} bad elements; options {options}")


def compare_states(opt_f, opt_r, fused, ref, keys, rtol, atol):
    for pf, pr in zip(fused, ref):
        sf, sr = opt_f.state.get(pf, {}), opt_r.state.get(pr, {})
        for key in keys:
            if sr.get(key) is not None:
                torch.testing.assert_close(sf[key].to(sr[key].dtype), sr[key], rtol=rtol, atol=atol)
        if "step" in sr:
            assert float(sf["step"]) == float(sr["step"])


def step_in_lockstep(rng, opt_f, opt_r, fused, ref, options, dtype):
    """STEPS steps of both optimizers on the same fresh grads, params compared
    after each; returns the (rtol, atol) used."""
    rtol, atol = (1e-5, 1e-6) if dtype is torch.float32 else (1e-12, 1e-14)
    for step in range(STEPS):
        set_grads(rng, fused, ref, step, dtype)
        opt_f.step()
        opt_r.step()
        assert_close_every(fused, ref, step, options, rtol, atol)
    return rtol, atol


# ---- the tests -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("draw", range(3))
def test_matches_torch_every_step(name, dtype, draw, seed):
    rng = random.Random(seed)
    fused, ref = make_pairs(rng, dtype, dtype)
    opt_f, opt_r, options = build(name, rng, fused, ref)
    rtol, atol = step_in_lockstep(rng, opt_f, opt_r, fused, ref, options, dtype)
    compare_states(opt_f, opt_r, fused, ref, OPTIMIZERS[name][2], rtol, atol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_16bit_params_within_rounding_of_fp32_reference(name, dtype, seed):
    """16-bit params, fp32 state: torch.optim in fp32 whose params are rounded to `dtype` after each step."""
    rng = random.Random(seed)
    fused, ref = make_pairs(rng, dtype, torch.float32)
    opt_f, opt_r, options = build(name, rng, fused, ref)
    for step in range(STEPS):
        set_grads(rng, fused, ref, step, dtype)
        opt_f.step()
        opt_r.step()
        with torch.no_grad():
            for pr in ref:
                pr.copy_(pr.to(dtype).float())
        assert_within_ulps(fused, ref, dtype, step, options)
        # Restart the reference from fusedopt's params: a 1-ulp difference would
        # otherwise ride along and, once a param crosses zero, exceed any ulp
        # bound at the new, smaller magnitude. So each step is checked from
        # identical params (the fp32 states stay the reference's own).
        with torch.no_grad():
            for pf, pr in zip(fused, ref):
                pr.copy_(pf.float())
    for pf in fused:
        st = opt_f.state.get(pf, {})
        for key, value in st.items():
            if key != "step" and value is not None:
                assert value.dtype is torch.float32, f"state['{key}'] of a {dtype} param is {value.dtype}"


class EpsInsideSqrtAdam(torch.optim.Optimizer):
    """Reference Adam/AdamW with denominator sqrt(v_hat / (1 - beta2^t) + eps), per tensor, torch's op order."""

    def __init__(self, params, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize, decoupled_weight_decay=decoupled_weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad.clone()
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                    st["max_exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["step"]
                if wd != 0:
                    if group["decoupled_weight_decay"]:
                        p.mul_(1 - lr * wd)
                    else:
                        g = g.add(p, alpha=wd)
                st["exp_avg"].lerp_(g, 1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                second = st["exp_avg_sq"]
                if group["amsgrad"]:
                    torch.maximum(st["max_exp_avg_sq"], second, out=st["max_exp_avg_sq"])
                    second = st["max_exp_avg_sq"]
                denom = (second / (1 - beta2 ** t)).add_(group["eps"]).sqrt_()
                p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - beta1 ** t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_eps_inside_sqrt_matches_reference(name, dtype, seed):
    rng = random.Random(seed)
    fused, ref = make_pairs(rng, dtype, dtype)
    groups = split_groups(rng, len(fused), 2)
    options = [adam_options(rng) for _ in groups]
    for o in options:
        o["decoupled_weight_decay"] = True if name == "AdamW" else o["decoupled_weight_decay"]
        o["eps"] = rng.choice([1e-8, 1e-6, 1e-3])
    cls = getattr(fusedopt, name)
    extra = (lambda o: {k: v for k, v in o.items() if k != "decoupled_weight_decay"}) if name == "AdamW" else dict
    opt_f = cls([dict(params=[fused[i] for i in g], **extra(o)) for g, o in zip(groups, options)],
                eps_inside_sqrt=True)
    opt_r = EpsInsideSqrtAdam([dict(params=[ref[i] for i in g], **o) for g, o in zip(groups, options)],
                              **{k: v for k, v in options[0].items()})
    step_in_lockstep(rng, opt_f, opt_r, fused, ref, options, dtype)


def test_eps_inside_sqrt_differs_from_torch_form(seed):
    """The option is not a no-op: with a large eps the two denominators give different params."""
    p1 = torch.randn(100)
    p2 = p1.clone()
    g = torch.randn(100) * 1e-3
    for p, inside in ((p1, True), (p2, False)):
        p.grad = g.clone()
        fusedopt.Adam([p], lr=0.1, eps=1e-2, eps_inside_sqrt=inside).step()
    assert not torch.allclose(p1, p2)


def test_one_kernel_call_per_device_dtype_batch(monkeypatch, seed):
    """A group holding fp32, bf16 and fp64 params makes three _C calls per step, whatever the tensor count."""
    calls = []

    from fusedopt._kernels import launch as kernel_launch
    real = kernel_launch._C

    class Counting:
        def __getattr__(self, attr):
            fn = getattr(real, attr)
            if attr.startswith("multi_tensor"):
                def counted(*a, **k):
                    calls.append(attr)
                    return fn(*a, **k)
                return counted
            return fn

    monkeypatch.setattr(kernel_launch, "_C", Counting())
    params = [torch.randn(n, dtype=dt) for n in (5, 100, 1) for dt in (torch.float32, torch.bfloat16, torch.float64)]
    params += [torch.randn(7) for _ in range(50)]
    for cls in (fusedopt.Adam, fusedopt.SGD):
        opt = cls(params, lr=1e-2, **({"momentum": 0.9} if cls is fusedopt.SGD else {}))
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            calls.clear()
            opt.step()
            assert len(calls) == 3, calls


def test_view_param_writes_only_its_own_elements(seed):
    """A param that is a view into a larger storage: the elements around it stay untouched (NaN sentinels)."""
    storage = torch.full((64,), float("nan"))
    p = storage[3:3 + 50]
    p.copy_(torch.randn(50))
    p.grad = torch.randn(50)
    for cls in (fusedopt.Adam, fusedopt.SGD):
        cls([p], lr=0.1).step()
    assert storage[:3].isnan().all() and storage[53:].isnan().all()
    assert not p.isnan().any()
