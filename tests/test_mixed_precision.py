"""master_weights=True (fp32 master of 16-bit params) and state_dtype=torch.bfloat16."""
import io

import pytest
import torch

import fusedopt

OPTS = [
    (fusedopt.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    (fusedopt.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3)),
    (fusedopt.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
]
IDS = [c.__name__ for c, _, _ in OPTS]
SHAPES = [(7, 5), (33,), (4, 3, 2)]


def params16(dtype):
    return [torch.randn(s).to(dtype).requires_grad_() for s in SHAPES]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fcls,tcls,kw", OPTS, ids=IDS)
def test_master_weights_track_fp32_reference(fcls, tcls, kw, dtype):
    ps = params16(dtype)
    ref = [p.detach().float().requires_grad_() for p in ps]
    opt = fcls(ps, master_weights=True, **kw)
    ref_opt = tcls(ref, foreach=False, **kw)
    for _ in range(5):
        for p, r in zip(ps, ref):
            g = torch.randn(p.shape).to(dtype)
            p.grad, r.grad = g, g.float()
        opt.step(), ref_opt.step()
        for p, r in zip(ps, ref):
            master = opt.state[p]["master"]
            assert master.dtype is torch.float32
            torch.testing.assert_close(master, r.detach(), rtol=1e-6, atol=1e-7)
            assert torch.equal(p.detach(), master.to(dtype))  # param = master rounded to nearest even


def assert_16bit_params_drift_without_master(fcls, kw):
    """What master weights are for: small updates are lost when bf16 params are rounded."""
    p = (torch.ones(64) + torch.rand(64)).bfloat16().requires_grad_()
    q = p.detach().clone().requires_grad_()
    a, b = fcls([p], **kw), fcls([q], master_weights=True, **kw)
    for _ in range(40):
        g = (torch.rand(64) + 0.5).bfloat16()
        p.grad, q.grad = g, g.clone()
        a.step(), b.step()
    assert "master" not in a.state[p] and "master" in b.state[q]
    assert not torch.equal(p, q)


@pytest.mark.parametrize("fcls,tcls,kw", OPTS, ids=IDS)
def test_without_master_16bit_params_drift_from_reference(fcls, tcls, kw):
    assert_16bit_params_drift_without_master(fcls, dict(kw, lr=2e-4))


def assert_checkpoint_resume_is_bit_exact(fcls, kw, state_dtype):
    """bf16 params with master weights: saving mid-training and resuming in a new
    optimizer continues with the same bits (params, master, states)."""
    ps = params16(torch.bfloat16)
    grads = [[torch.randn(s).bfloat16() for s in SHAPES] for _ in range(6)]
    opt = fcls(ps, master_weights=True, state_dtype=state_dtype, **kw)

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
    opt2 = fcls(resumed, master_weights=True, state_dtype=state_dtype, **kw)
    opt2.load_state_dict(ck["opt"])
    assert opt2.state[resumed[0]]["master"].dtype is torch.float32
    run(resumed, opt2, grads[3:])
    for a, b in zip(ps, resumed):
        assert torch.equal(a, b)
        assert set(opt.state[a]) == set(opt2.state[b]) and "master" in opt.state[a]
        for k, v in opt.state[a].items():
            assert torch.equal(v, opt2.state[b][k]), k


@pytest.mark.parametrize("fcls,tcls,kw", OPTS, ids=IDS)
def test_checkpoint_resume_is_bit_exact(fcls, tcls, kw):
    assert_checkpoint_resume_is_bit_exact(fcls, kw, torch.bfloat16)


@pytest.mark.parametrize("fcls,tcls,kw", OPTS, ids=IDS)
def test_bf16_state_is_fp32_math_with_rounded_state(fcls, tcls, kw):
    """Reference: torch.optim on fp32 whose states are rounded to bf16 after every step."""
    ps = [torch.randn(s).requires_grad_() for s in SHAPES]
    ref = [p.detach().clone().requires_grad_() for p in ps]
    opt = fcls(ps, state_dtype=torch.bfloat16, **kw)
    ref_opt = tcls(ref, foreach=False, **kw)
    for _ in range(5):
        for p, r in zip(ps, ref):
            g = torch.randn(p.shape)
            p.grad, r.grad = g, g.clone()
        opt.step(), ref_opt.step()
        for r in ref:
            for k, v in ref_opt.state[r].items():
                if torch.is_tensor(v) and v.shape == r.shape:
                    v.copy_(v.bfloat16().float())
        for p, r in zip(ps, ref):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)
            for k, v in ref_opt.state[r].items():
                if torch.is_tensor(v) and v.shape == r.shape:
                    assert opt.state[p][k].dtype is torch.bfloat16
                    torch.testing.assert_close(opt.state[p][k].float(), v, rtol=8e-3, atol=1e-6)


def test_state_dtype_and_master_weights_are_validated():
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="state_dtype"):
        fusedopt.Adam([p], state_dtype=torch.float16)
    with pytest.raises(TypeError, match="master_weights"):
        fusedopt.SGD([p], master_weights="yes")


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
