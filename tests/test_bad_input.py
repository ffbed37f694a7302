"""Bad input (issue 2): a Python exception naming the offending parameter and the
expectation, raised before anything is written. After each failed call the
params, grads and optimizer state are compared bit for bit with a snapshot."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import fusedopt
from reference_optim import RefLAMB, RefLARS

OPTIMIZERS = {
    "SGD": lambda params, **kw: fusedopt.SGD(params, lr=0.1, momentum=0.9, **kw),
    "Adam": lambda params, **kw: fusedopt.Adam(params, lr=0.1, amsgrad=True, **kw),
    "AdamW": lambda params, **kw: fusedopt.AdamW(params, lr=0.1, **kw),
    "LARS": lambda params, **kw: fusedopt.LARS(params, lr=0.1, momentum=0.9, weight_decay=1e-3, **kw),
    "LAMB": lambda params, **kw: fusedopt.LAMB(params, lr=0.1, weight_decay=0.01, **kw),
}


# ---- bitwise snapshots ----------------------------------------------------------------------
def bits(t: torch.Tensor):
    """The tensor's bytes (NaN-safe equality, -0.0 != 0.0); meta tensors have none."""
    if t.device.type == "meta":
        return ("meta", t.shape, t.dtype)
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def snapshot(opt):
    snap = []
    for group in opt.param_groups:
        for p in group["params"]:
            snap.append(("param", p.dtype, p.shape, bits(p)))
            snap.append(("grad", None if p.grad is None else (p.grad.dtype, p.grad.shape, p.grad.layout,
                                                              bits(p.grad) if p.grad.layout is torch.strided
                                                              else bits(p.grad.to_dense()))))
            st = opt.state.get(p)
            snap.append(("state", None if st is None else
                         {k: (bits(v), v.dtype, v.shape) if isinstance(v, torch.Tensor) else v
                          for k, v in st.items()}))
    snap.append(("groups", [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]))
    return snap


def same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):  # bitwise, so a NaN (e.g. a tensor lr) equals itself
        return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                and (torch.equal(a, b) or (a.device.type != "meta" and torch.equal(bits(a), bits(b)))))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def assert_rejected(opt, call, exc, *needles):
    """call() raises exc whose message holds every needle; opt's params, grads and state are untouched."""
    before = snapshot(opt)
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"message {msg!r} does not mention {needle!r}"
    assert same(snapshot(opt), before), "a failed call changed params, grads or state"
    return msg


def trained(name, n=3, steps=2, **kw):
    """An optimizer over n fp32 params that has already taken `steps` good steps (state exists)."""
    params = [torch.randn(5 + i) for i in range(n)]
    opt = OPTIMIZERS[name](params, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    return opt, params


NAMES = list(OPTIMIZERS)


# ---- grads ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_grad_dtype_differs_from_param(name):
    opt, params = trained(name)
    params[1].data = params[1].data.to(torch.bfloat16)  # grad stays fp32
    assert_rejected(opt, opt.step, TypeError, "param_groups[0]['params'][1]", "grad", "expected torch.bfloat16")


@pytest.mark.parametrize("name", NAMES)
def test_grad_shape_differs_from_param(name):
    opt, params = trained(name)
    params[2].data = torch.randn(4)  # param replaced after its grad: grad and state no longer fit
    msg = assert_rejected(opt, opt.step, ValueError, "param_groups[0]['params'][2]", "expected")
    assert "shape" in msg


@pytest.mark.parametrize("name", NAMES)
def test_grad_shape_differs_only_grad(name):
    opt, params = trained(name, steps=0)
    g = torch.randn(params[0].shape)
    params[0].grad = g
    params[0].data = torch.randn(params[0].numel() + 1)
    assert_rejected(opt, opt.step, ValueError, "grad of param_groups[0]['params'][0]", "shape", "expected")
    assert len(opt.state) == 0


@pytest.mark.parametrize("name", NAMES)
def test_sparse_grad(name):
    opt, params = trained(name)
    params[0].grad = torch.randn_like(params[0]).to_sparse()
    assert_rejected(opt, opt.step, TypeError, "param_groups[0]['params'][0]", "sparse", "dense")


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_grad(name):
    p = torch.randn(4, 6)
    opt = OPTIMIZERS[name]([p])
    p.grad = torch.randn(6, 4).t()
    assert_rejected(opt, opt.step, ValueError, "param_groups[0]['params'][0]", "contiguous")


@pytest.mark.parametrize("name", NAMES)
def test_grad_aliases_param(name):
    opt, params = trained(name)
    params[1].grad = params[1].detach()
    assert_rejected(opt, opt.step, ValueError, "param_groups[0]['params'][1]", "shares memory")


# ---- params ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.complex64])
def test_unsupported_param_dtype(name, dtype):
    good = torch.randn(3)
    bad = torch.ones(3, dtype=dtype)
    opt = OPTIMIZERS[name]([good, bad])
    good.grad = torch.randn(3)
    bad.grad = torch.ones(3, dtype=dtype)
    msg = assert_rejected(opt, opt.step, TypeError, "param_groups[0]['params'][1]", str(dtype))
    assert "float32" in msg  # says what is expected
    assert len(opt.state) == 0


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_param(name):
    p = torch.randn(6, 4).t()
    opt = OPTIMIZERS[name]([p])
    p.grad = torch.randn(4, 6)
    assert_rejected(opt, opt.step, ValueError, "param_groups[0]['params'][0]", "contiguous")


@pytest.mark.parametrize("name", NAMES)
def test_param_on_unsupported_device(name):
    good = torch.randn(3)
    bad = torch.empty(3, device="meta")
    opt = OPTIMIZERS[name]([good, bad])
    good.grad = torch.randn(3)
    bad.grad = torch.empty(3, device="meta")
    assert_rejected(opt, opt.step, ValueError, "param_groups[0]['params'][1]", "meta", "cpu")


@pytest.mark.parametrize("name", NAMES)
def test_params_sharing_memory(name):
    storage = torch.randn(20)
    a, b = storage[:12], storage[8:]
    opt = OPTIMIZERS[name]([a, b])
    a.grad, b.grad = torch.randn(12), torch.randn(12)
    assert_rejected(opt, opt.step, ValueError, "shares memory")


# ---- state ----------------------------------------------------------------------------------
STATE_KEY = {"SGD": "momentum_buffer", "Adam": "exp_avg_sq", "AdamW": "exp_avg", "LARS": "momentum_buffer",
             "LAMB": "exp_avg_sq"}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("what", ["shape", "dtype", "device", "missing"])
def test_state_does_not_fit_param(name, what):
    opt, params = trained(name)
    key = STATE_KEY[name]
    st = opt.state[params[1]]
    old = st[key]
    if what == "missing" and name in ("SGD", "LARS"):
        pytest.skip("torch.optim.SGD treats a missing momentum buffer as the first step")
    bad = {"shape": lambda: torch.zeros(old.numel() + 2), "dtype": lambda: old.to(torch.float16),
           "device": lambda: torch.empty(old.shape, device="meta"), "missing": None}[what]
    if bad is None:
        del st[key]
    else:
        st[key] = bad()
    needles = {"shape": ("shape", "expected"), "dtype": ("dtype", "expected torch.float32"),
               "device": ("meta", "expected cpu"), "missing": (key,)}[what]
    assert_rejected(opt, opt.step, (TypeError, ValueError), "param_groups[0]['params'][1]", *needles)


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_with_wrong_shape_changes_nothing(name):
    opt, params = trained(name)
    sd = opt.state_dict()
    key = STATE_KEY[name]
    sd["state"][2][key] = torch.zeros(3)
    sd["param_groups"][0]["lr"] = 0.5  # would be applied if loading went half way
    assert_rejected(opt, lambda: opt.load_state_dict(sd), ValueError, "param_groups[0]['params'][2]", key,
                    "shape", "expected")
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_with_bad_hyperparameter_changes_nothing(name):
    opt, params = trained(name)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = -1.0
    assert_rejected(opt, lambda: opt.load_state_dict(sd), ValueError, "lr", "expected")


# ---- hyperparameters ------------------------------------------------------------------------
BAD_HYPER = [
    ("SGD", dict(lr=float("nan")), "lr"),
    ("SGD", dict(lr=-0.1), "lr"),
    ("SGD", dict(momentum=-0.5), "momentum"),
    ("SGD", dict(weight_decay=-1e-4), "weight_decay"),
    ("SGD", dict(nesterov=True, momentum=0.0), "nesterov"),
    ("SGD", dict(nesterov=True, momentum=0.9, dampening=0.1), "nesterov"),
    ("Adam", dict(lr=-1e-3), "lr"),
    ("Adam", dict(lr=float("nan")), "lr"),
    ("Adam", dict(betas=(1.0, 0.999)), "betas[0]"),
    ("Adam", dict(betas=(-0.1, 0.999)), "betas[0]"),
    ("Adam", dict(betas=(0.9, 1.0)), "betas[1]"),
    ("Adam", dict(betas=(0.9, float("nan"))), "betas[1]"),
    ("Adam", dict(betas=(0.9,)), "betas"),
    ("Adam", dict(eps=0.0), "eps"),
    ("Adam", dict(eps=-1e-8), "eps"),
    ("Adam", dict(weight_decay=-0.1), "weight_decay"),
    ("AdamW", dict(eps=float("nan")), "eps"),
    ("AdamW", dict(weight_decay=-0.01), "weight_decay"),
    ("AdamW", dict(lr=torch.tensor(-1.0)), "lr"),
    ("LARS", dict(lr=float("nan")), "lr"),
    ("LARS", dict(trust_coeff=-1e-3), "trust_coeff"),
    ("LARS", dict(trust_coeff=float("inf")), "trust_coeff"),
    ("LARS", dict(eps=-1e-8), "eps"),
    ("LARS", dict(momentum=-0.9), "momentum"),
    ("LARS", dict(weight_decay=float("nan")), "weight_decay"),
    ("LARS", dict(nesterov=True, momentum=0.0), "nesterov"),
    ("LARS", dict(lr=torch.tensor(float("nan"))), "lr"),
    ("LAMB", dict(lr=-1e-3), "lr"),
    ("LAMB", dict(betas=(1.0, 0.999)), "betas[0]"),
    ("LAMB", dict(betas=(0.9, -0.5)), "betas[1]"),
    ("LAMB", dict(eps=0.0), "eps"),
    ("LAMB", dict(eps=float("nan")), "eps"),
    ("LAMB", dict(max_grad_norm=0.0), "max_grad_norm"),
    ("LAMB", dict(max_grad_norm=-1.0), "max_grad_norm"),
    ("LAMB", dict(max_grad_norm=float("nan")), "max_grad_norm"),
    ("LAMB", dict(weight_decay=-0.01), "weight_decay"),
]
CLASSES = {"SGD": fusedopt.SGD, "Adam": fusedopt.Adam, "AdamW": fusedopt.AdamW, "LARS": fusedopt.LARS,
           "LAMB": fusedopt.LAMB}


@pytest.mark.parametrize("name,kwargs,key", BAD_HYPER, ids=[f"{n}-{k}-{v}" for n, kw, k in BAD_HYPER
                                                              for v in [list(kw.values())[-1]]])
def test_invalid_hyperparameter_at_construction(name, kwargs, key):
    with pytest.raises(ValueError) as info:
        CLASSES[name]([torch.randn(3)], **kwargs)
    msg = str(info.value)
    assert key in msg, msg
    assert "expected" in msg or "requires" in msg or "must" in msg, msg


@pytest.mark.parametrize("name,kwargs,key", BAD_HYPER, ids=[f"{n}-{k}-{v}" for n, kw, k in BAD_HYPER
                                                              for v in [list(kw.values())[-1]]])
def test_invalid_hyperparameter_set_later_fails_step_without_writing(name, kwargs, key):
    opt, params = trained(name)
    opt.param_groups[0].update(kwargs)
    assert_rejected(opt, opt.step, ValueError, key)


def test_non_number_hyperparameter():
    with pytest.raises(TypeError, match="lr"):
        fusedopt.Adam([torch.randn(3)], lr="0.1")


def test_differentiable_rejected():
    with pytest.raises(ValueError, match="differentiable"):
        fusedopt.SGD([torch.randn(3)], lr=0.1, differentiable=True)


# ---- validate everything before writing anything ---------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("problem", ["bad_lr", "bad_param", "bad_grad", "bad_state"])
@pytest.mark.parametrize("fresh", [False, True])
def test_bad_second_group_leaves_first_group_untouched(name, problem, fresh):
    """The first group (already trained, or never stepped) must not move when the second is bad."""
    first = [torch.randn(7), torch.randn(3, 3), torch.randn(())]
    second = [torch.randn(5), torch.randn(4, 6)]
    opt = OPTIMIZERS[name]([{"params": first}, {"params": second}])
    if not fresh:
        for _ in range(2):
            for p in first + second:
                p.grad = torch.randn_like(p)
            opt.step()
    for p in first + second:
        p.grad = torch.randn_like(p)
    if problem == "bad_lr":
        opt.param_groups[1]["lr"] = float("nan")
        exc, needles = ValueError, ("lr", "param_groups[1]")
    elif problem == "bad_param":
        second[1].data = torch.randn(6, 4).t()  # non-contiguous
        second[1].grad = torch.randn(6, 4).t()
        exc, needles = ValueError, ("param_groups[1]['params'][1]", "contiguous")
    elif problem == "bad_grad":
        second[0].grad = torch.randn(5, dtype=torch.float64).to(torch.float32).to_sparse()
        exc, needles = TypeError, ("param_groups[1]['params'][0]", "sparse")
    else:
        if fresh:
            pytest.skip("no state before the first step")
        opt.state[second[0]][STATE_KEY[name]] = torch.zeros(2)
        exc, needles = ValueError, ("param_groups[1]['params'][0]", "shape")
    assert_rejected(opt, opt.step, exc, *needles)
    if fresh:
        assert len(opt.state) == 0, "state was created for the good group before the bad one was checked"


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_usable_after_rejected_step(name, seed):
    """After a rejected step and the fix, fusedopt continues exactly like torch from the same state."""
    opt, params = trained(name)
    good_grad = params[0].grad
    params[0].grad = good_grad.to_sparse()
    with pytest.raises(TypeError):
        opt.step()
    params[0].grad = good_grad
    ref_params = [p.clone() for p in params]
    ref = {"SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False),
           "Adam": lambda ps: torch.optim.Adam(ps, lr=0.1, amsgrad=True, foreach=False),
           "AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.1, foreach=False),
           "LARS": lambda ps: RefLARS(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
           "LAMB": lambda ps: RefLAMB(ps, lr=0.1, weight_decay=0.01)}[name](ref_params)
    # deepcopy: torch's load_state_dict keeps (does not copy) tensors already of the right dtype/device
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    for rp, p in zip(ref_params, params):
        rp.grad = p.grad.clone()
    opt.step()
    ref.step()
    for rp, p in zip(ref_params, params):
        torch.testing.assert_close(p, rp, rtol=1e-5, atol=1e-6)
