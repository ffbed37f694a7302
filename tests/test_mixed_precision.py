"""master_weights=True (fp32 master of 16-bit params) and state_dtype=torch.bfloat16,
for every optimizer of the registry's TRAINING list. The reference is
reference_optim.MixedPrecisionReference: the optimizer's fp32 math on fp32
masters, params rounded to nearest even, states rounded to bf16."""
import io

import pytest
import torch

import fusedopt
from optim_registry import TRAINING
from reference_optim import MixedPrecisionReference, drift_tol

SHAPES = [(7, 5), (33,), (4, 3, 2)]
specs = pytest.mark.parametrize("spec", TRAINING, ids=repr)


def params16(dtype):
    return [torch.randn(s).to(dtype).requires_grad_() for s in SHAPES]


def reference(spec, params, **options):
    """The reference over copies of params (same dtype), with the fused optimizer's options."""
    copies = [p.detach().clone() for p in params]
    return MixedPrecisionReference(spec.reference, copies, **options, **spec.hyper)


def set_grads(params, ref, dtype):
    for p, q in zip(params, ref.params):
        p.grad = torch.randn(p.shape).to(dtype)
        q.grad = p.grad.clone()


def assert_rounded(got, master, dtype, atol, rtol=0.0):
    """got (16-bit) is the reference's fp32 master rounded to nearest even, exactly,
    except where the master lies within atol + rtol * |master| (the fp32 tolerance
    between fused and reference masters, as assert_close applies it) of a rounding
    boundary: there a 16-bit value within that distance is right."""
    slack = atol + rtol * master.abs()
    lo, hi = (master - slack).to(dtype), (master + slack).to(dtype)
    # Where the slack spans several 16-bit values (small elements), any of them is right.
    wrong = (got != master.to(dtype)) & ~((got >= lo) & (got <= hi))
    assert not wrong.any(), (f"{int(wrong.sum())} elements are not the master rounded: got "
                             f"{got[wrong][:4].tolist()}, master {master[wrong][:4].tolist()}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@specs
def test_master_weights_track_fp32_reference(spec, dtype):
    """The fp32 reference runs on the master values; the update (and LARS/LAMB's trust
    ratio) must come from them too. Half way, the masters are scaled by 1.003 (less
    than a bf16 ulp, so the 16-bit params barely change): an update computed from the
    params would now be off."""
    ps = params16(dtype)
    opt = spec.make(ps, master_weights=True, **spec.hyper)
    ref = reference(spec, ps, master_weights=True)
    for step in range(6):
        if step == 3:
            for p, m in zip(ps, ref.masters):
                opt.state[p]["master"].mul_(1.003)
                m.copy_(opt.state[p]["master"])
        set_grads(ps, ref, dtype)
        opt.step()
        ref.step()
        for p, m, q in zip(ps, ref.masters, ref.params):
            master = opt.state[p]["master"]
            assert master.dtype is torch.float32
            rtol, atol = drift_tol(torch.float32, step + 1, float(m.abs().max()))
            torch.testing.assert_close(master, m, rtol=rtol, atol=atol)
            assert torch.equal(p.detach(), master.to(dtype))  # param = master rounded to nearest even
            assert_rounded(p.detach(), m, dtype, atol, rtol)


@specs
def test_without_master_small_updates_are_lost(spec):
    """What master weights are for: with updates below half a bf16 ulp, bf16 params
    without a master keep losing them (as the reference that rounds p each step
    does), while the master run keeps them (as the fp32-master reference does)."""
    hyper = dict(spec.hyper, lr=spec.hyper["lr"] / 50)
    p = (torch.ones(64) + torch.rand(64)).bfloat16().requires_grad_()
    q = p.detach().clone().requires_grad_()
    plain, master = spec.make([p], **hyper), spec.make([q], master_weights=True, **hyper)
    ref_plain = MixedPrecisionReference(spec.reference, [p.detach().clone()], **hyper)
    ref_master = MixedPrecisionReference(spec.reference, [q.detach().clone()], master_weights=True, **hyper)
    for step in range(40):
        g = (torch.rand(64) + 0.5).bfloat16()
        for o, r, x in ((plain, ref_plain, p), (master, ref_master, q)):
            x.grad, r.params[0].grad = g.clone(), g.clone()
            o.step()
            r.step()
        rtol, atol = drift_tol(torch.float32, step + 1, 2.0)
        # Each step checked from identical params: a rounding that went the other way
        # once would otherwise ride along as an ulp of offset.
        assert_rounded(p.detach(), ref_plain.masters[0], torch.bfloat16, atol)
        ref_plain.params[0].copy_(p.detach())
        torch.testing.assert_close(master.state[q]["master"], ref_master.masters[0], rtol=rtol, atol=atol)
        assert_rounded(q.detach(), ref_master.masters[0], torch.bfloat16, atol)
    assert "master" not in plain.state[p] and "master" in master.state[q]
    assert not torch.equal(p, q)


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
@specs
def test_checkpoint_resume_is_bit_exact(spec, state_dtype):
    """bf16 params with master weights: saving mid-training and resuming in a new
    optimizer continues with the same bits (params, master, states)."""
    ps = params16(torch.bfloat16)
    grads = [[torch.randn(s).bfloat16() for s in SHAPES] for _ in range(6)]
    opt = spec.make(ps, master_weights=True, state_dtype=state_dtype, **spec.hyper)

    def run(params, o, gs):
        for step_grads in gs:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            o.step()

    run(ps, opt, grads[:3])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in ps], "opt": opt.state_dict()}, buf)
    run(ps, opt, grads[3:])

    buf.seek(0)
    ck = torch.load(buf)
    resumed = [t.clone().requires_grad_() for t in ck["params"]]
    opt2 = spec.make(resumed, master_weights=True, state_dtype=state_dtype, **spec.hyper)
    opt2.load_state_dict(ck["opt"])
    assert opt2.state[resumed[0]]["master"].dtype is torch.float32
    run(resumed, opt2, grads[3:])
    for a, b in zip(ps, resumed):
        assert torch.equal(a, b)
        assert set(opt.state[a]) == set(opt2.state[b]) and "master" in opt.state[a]
        for k, v in opt.state[a].items():
            assert torch.equal(v, opt2.state[b][k]), k


@specs
def test_bf16_state_is_fp32_math_with_rounded_state(spec):
    """fp32 params, bf16 state: the reference's fp32 math with its states rounded to bf16.
    The same run with fp32 state gives other bits: the option does something."""
    ps = [torch.randn(s).requires_grad_() for s in SHAPES]
    fp32_state = [p.detach().clone().requires_grad_() for p in ps]
    opt = spec.make(ps, state_dtype=torch.bfloat16, **spec.hyper)
    opt_fp32_state = spec.make(fp32_state, **spec.hyper)
    ref = reference(spec, ps, state_dtype=torch.bfloat16)
    # A state may be one bf16 ulp off the reference's (a tie of the two fp32
    # values around a bf16 rounding boundary, allowed below), and the update
    # computed from it is then off by up to that relative amount: each step adds
    # bf16 eps times the size of that step's update to the param bound.
    state_slack = [0.0] * len(ps)
    bf16_eps = torch.finfo(torch.bfloat16).eps
    for step in range(5):
        set_grads(ps, ref, torch.float32)
        for p, q in zip(ps, fp32_state):
            q.grad = p.grad.clone()
        before = [r.detach().clone() for r in ref.params]
        opt.step()
        opt_fp32_state.step()
        ref.step()
        for i, (p, r) in enumerate(zip(ps, ref.params)):
            state_slack[i] += 2 * bf16_eps * float((r.detach() - before[i]).abs().max())
            rtol, atol = drift_tol(torch.float32, step + 1, float(r.abs().max()))
            torch.testing.assert_close(p.detach(), r, rtol=rtol, atol=atol + state_slack[i])
            for key in spec.keys_of(p):
                got, want = opt.state[p][key], ref.state(i)[key]
                assert got.dtype is torch.bfloat16, key
                # the same fp32 value rounded on both sides, up to one bf16 ulp where they differ;
                # an element near zero keeps the absolute error of the larger values it came from
                torch.testing.assert_close(got.float(), want, rtol=bf16_eps,
                                           atol=atol + 2 * bf16_eps * float(want.abs().max()))
    assert any(not torch.equal(a, b) for a, b in zip(ps, fp32_state))


@specs
def test_state_dtype_and_master_weights_are_validated(spec):
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="state_dtype"):
        spec.make([p], state_dtype=torch.float16, **spec.hyper)
    with pytest.raises(TypeError, match="master_weights"):
        spec.make([p], master_weights="yes", **spec.hyper)


@specs
def test_master_weights_ignored_for_fp32_params(spec):
    p = torch.randn(10, requires_grad=True)
    p.grad = torch.randn(10)
    opt = spec.make([p], master_weights=True, **spec.hyper)
    opt.step()
    assert "master" not in opt.state[p]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@specs
def test_state_follows_the_param_dtype(spec, dtype):
    p = torch.nn.Parameter(torch.randn(20, dtype=dtype))
    p.grad = torch.randn(20, dtype=dtype)
    opt = spec.make([p], **spec.hyper)
    opt.step()
    for key in spec.keys_of(p):
        assert opt.state[p][key].dtype is dtype, key


def test_master_is_added_when_loading_a_checkpoint_without_one():
    p = torch.randn(10).bfloat16().requires_grad_()
    q = p.detach().float().requires_grad_()
    ref = torch.optim.Adam([q], lr=1e-2)
    q.grad = torch.randn(10)
    ref.step()
    opt = fusedopt.Adam([p], lr=1e-2, master_weights=True)
    opt.load_state_dict(ref.state_dict())
    with torch.no_grad():
        p.copy_(q)
    p.grad = torch.randn(10).bfloat16()
    opt.step()
    assert opt.state[p]["master"].dtype is torch.float32
    assert torch.equal(p.detach(), opt.state[p]["master"].bfloat16())
