"""The two-call step LARS and LAMB take for sharded (FSDP2) params, where the
per-tensor norm sums are all-reduced between the calls: on plain tensors (no
reduction to do) it must give the same bits as the fused one-call step. The
private ``_split_steps`` switch forces it, so CI covers the split kernels
without spawning ranks (tests/test_distributed.py runs them sharded)."""
import copy

import pytest
import torch

import fusedopt

SHAPES = [(70000,), (33, 17), (5,), (1,)]
CASES = [
    (fusedopt.LARS, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, trust_coeff=0.02)),
    (fusedopt.LARS, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0, always_adapt=True,
                         trust_clip=True)),
    (fusedopt.LAMB, dict(lr=1e-2, weight_decay=0.05, max_grad_norm=0.5)),
    (fusedopt.LAMB, dict(lr=1e-2, weight_decay=0.05, max_grad_norm=None, decoupled_decay=True,
                         trust_clip=True)),
]
IDS = ["lars", "lars-nesterov-clip", "lamb-clipgrads", "lamb-decoupled"]
VARIANTS = [  # (param dtype, extra options)
    (torch.float32, {}),
    (torch.float32, dict(state_dtype=torch.bfloat16)),
    (torch.bfloat16, dict(master_weights=True)),
    (torch.float64, {}),
]
VARIANT_IDS = ["fp32", "bf16-state", "bf16-master", "fp64"]


def run(cls, kw, init, grads, split, scaler=None):
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = cls([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], **kw)
    opt._split_steps = split
    for i, gs in enumerate(grads):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        if scaler is not None:
            opt.grad_scale = torch.tensor(scaler)
            opt.found_inf = torch.tensor(1.0 if i == 2 else 0.0)  # step 2 is skipped
            for p in params:
                p.grad.mul_(scaler)
        opt.step()
    return params, copy.deepcopy(opt.state_dict()["state"])


@pytest.mark.parametrize("dtype,extra", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_split_step_gives_the_fused_bits(cls, kw, dtype, extra):
    init = [torch.randn(s).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s).to(dtype) for s in SHAPES] for _ in range(4)]
    fused_p, fused_s = run(cls, dict(kw, **extra), init, grads, split=False)
    split_p, split_s = run(cls, dict(kw, **extra), init, grads, split=True)
    assert all(torch.equal(a, b) for a, b in zip(fused_p, split_p))
    for k, st in fused_s.items():
        assert set(st) == set(split_s[k])
        for name, v in st.items():
            assert torch.equal(v, split_s[k][name]), (k, name)
    if cls is fusedopt.LAMB:
        assert all(float(st["step"]) == 4 for st in split_s.values())  # advanced once per step


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_split_step_with_grad_scale_and_found_inf(cls, kw):
    init = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(4)]
    fused_p, fused_s = run(cls, kw, init, grads, split=False, scaler=512.0)
    split_p, split_s = run(cls, kw, init, grads, split=True, scaler=512.0)
    assert all(torch.equal(a, b) for a, b in zip(fused_p, split_p))
    for k, st in fused_s.items():
        for name, v in st.items():
            assert torch.equal(v, split_s[k][name]), (k, name)
    if cls is fusedopt.LAMB:
        assert all(float(st["step"]) == 3 for st in split_s.values())  # the skipped step did not count


def test_split_lamb_rejects_a_step_that_does_not_adapt():
    """The kernel refuses split flags when there are no norms (Python never sends them then)."""
    p = torch.nn.Parameter(torch.randn(8))
    p.grad = torch.randn(8)
    opt = fusedopt.LAMB([p], weight_decay=0.0)
    opt._split_steps = True
    opt.step()  # takes the fused path: nothing to all-reduce
    assert float(opt.state[p]["step"]) == 1
    from fusedopt._kernels import DeviceScalars, kernel_layout, launch_norm_scaled
    table = opt._plans[0].batches[0].table
    lamb = kernel_layout("lamb")
    flags = lamb.flags(bias_correction=True, grad_averaging=True, moments_only=True)
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="split LAMB step"):
        launch_norm_scaled(table, torch.float32, DeviceScalars(1e-3, None, None, None), hyper, flags)
