"""LARS and LAMB with state_dtype=torch.bfloat16 and master_weights=True, in the
manner of test_mixed_precision.py (which covers SGD, Adam, AdamW). References:
tests/reference_optim.py (fp64 math, states stored in the reference params' fp32)."""

import pytest
import torch

import fusedopt
from reference_optim import RefLAMB, RefLARS
from test_mixed_precision import assert_16bit_params_drift_without_master, assert_checkpoint_resume_is_bit_exact

SHAPES = [(7, 5), (33,), (4, 3, 2)]
LARS_KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, trust_coeff=0.02)
# max_grad_norm well below the norm of the grads drawn here, so clipping is active.
LAMB_KW = dict(lr=1e-2, weight_decay=0.05, max_grad_norm=0.5)
CASES = [(fusedopt.LARS, RefLARS, LARS_KW), (fusedopt.LAMB, RefLAMB, LAMB_KW)]
IDS = ["LARS", "LAMB"]


STATE_KEYS = {fusedopt.LARS: ("momentum_buffer",), fusedopt.LAMB: ("exp_avg", "exp_avg_sq")}


def ref_step(ref, ref_params, grads):
    for q, g in zip(ref_params, grads):
        q.grad = g.float()
    ref.step()


def states(fcls, opt, params):
    """[(key, [state[p][key] for p in params])] of the fused or the reference optimizer."""
    return [(k, [opt.state[p][k] for p in params]) for k in STATE_KEYS[fcls]]


@pytest.mark.parametrize("fcls,rcls,kw", CASES, ids=IDS)
def test_bf16_state_is_fp32_math_with_rounded_state(fcls, rcls, kw):
    """Reference: fp32 LARS/LAMB whose states are rounded to bf16 after every step."""
    ps = [torch.randn(s).requires_grad_() for s in SHAPES]
    ref_params = [p.detach().clone() for p in ps]
    opt = fcls(ps, state_dtype=torch.bfloat16, **kw)
    ref = rcls(ref_params, **kw)
    # LAMB: u (and so the step) comes from m, v as stored; LARS: the step uses the
    # fp32 buffer of this step, which is then stored rounded (as SGD).
    ref.round_state = lambda t: t.bfloat16().to(t.dtype)
    for _ in range(5):
        gs = [torch.randn(s) for s in SHAPES]
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
        ref_step(ref, ref_params, gs)
        for _, ts in states(fcls, ref, ref_params):
            for t in ts:
                t.copy_(t.bfloat16())
        for p, r in zip(ps, ref_params):
            torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
        for (key, got), (_, want) in zip(states(fcls, opt, ps), states(fcls, ref, ref_params)):
            for t, w in zip(got, want):
                assert t.dtype is torch.bfloat16, key
                torch.testing.assert_close(t.float(), w, rtol=8e-3, atol=1e-6)


@pytest.mark.parametrize("fcls,rcls,kw", CASES, ids=IDS)
def test_bf16_state_differs_from_fp32_state(fcls, rcls, kw):
    """The option does something: the same run with fp32 state gives other bits."""
    init = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(4)]
    out = []
    for sd in (None, torch.bfloat16):
        ps = [x.clone().requires_grad_() for x in init]
        opt = fcls(ps, state_dtype=sd, **kw)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        out.append(ps)
    assert any(not torch.equal(a, b) for a, b in zip(*out))


def test_state_dtype_is_validated():
    p = torch.randn(3, requires_grad=True)
    for cls in (fusedopt.LARS, fusedopt.LAMB):
        with pytest.raises(ValueError, match="state_dtype"):
            cls([p], state_dtype=torch.float16)


# ---- master_weights=True ------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fcls,rcls,kw", CASES, ids=IDS)
def test_master_weights_track_fp32_reference(fcls, rcls, kw, dtype):
    """The fp32 reference runs on the master values; the trust ratio must come from
    them too. Half way, the masters are scaled by 1.003 (less than a bf16 ulp, so the
    16-bit params barely change): a ratio taken from the params would now be off."""
    ps = [torch.randn(s).to(dtype).requires_grad_() for s in SHAPES]
    ref_params = [p.detach().float() for p in ps]
    opt = fcls(ps, master_weights=True, **kw)
    ref = rcls(ref_params, **kw)
    for step in range(6):
        if step == 3:
            for p, r in zip(ps, ref_params):
                opt.state[p]["master"].mul_(1.003)
                r.copy_(opt.state[p]["master"])
        gs = [torch.randn(s).to(dtype) for s in SHAPES]
        for p, g in zip(ps, gs):
            p.grad = g
        opt.step()
        ref_step(ref, ref_params, gs)
        for p, r in zip(ps, ref_params):
            master = opt.state[p]["master"]
            assert master.dtype is torch.float32
            torch.testing.assert_close(master, r, rtol=1e-6, atol=1e-7)
            assert torch.equal(p.detach(), master.to(dtype))  # param = master rounded to nearest even


@pytest.mark.parametrize("fcls,rcls,kw", CASES, ids=IDS)
def test_without_master_16bit_params_drift(fcls, rcls, kw):
    assert_16bit_params_drift_without_master(fcls, dict(kw, lr=kw["lr"] / 50))


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("fcls,rcls,kw", CASES, ids=IDS)
def test_checkpoint_resume_is_bit_exact(fcls, rcls, kw, state_dtype):
    assert_checkpoint_resume_is_bit_exact(fcls, kw, state_dtype)


@pytest.mark.parametrize("fcls,rcls,kw", CASES, ids=IDS)
def test_master_weights_ignored_for_fp32_params(fcls, rcls, kw):
    p = torch.randn(10, requires_grad=True)
    p.grad = torch.randn(10)
    opt = fcls([p], master_weights=True, **kw)
    opt.step()
    assert "master" not in opt.state[p]
