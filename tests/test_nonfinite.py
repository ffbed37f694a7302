"""A step with inf or nan grads does what the reference does, element for element:
the same values, and NaN/inf in the same places (params and state)."""
import pytest
import torch

from optim_registry import OPTIMIZERS, cases

POISON = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
# The finite elements at the dtype's precision: one step of fp32 math is a few
# roundings apart from torch's (or the fp64 reference's); fp64 math a few fp64 ones.
TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-14)}


@pytest.mark.parametrize("spec,dtype", cases(OPTIMIZERS, [torch.float32, torch.float64]))
@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "mixed"])
def test_nonfinite_grads_match_reference(spec, kind, dtype):
    rtol, atol = TOL[dtype]
    params = [torch.nn.Parameter(torch.randn(n, dtype=dtype)) for n in (37, 1000)]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = spec.make(params, **spec.hyper), spec.reference(ref_params, **spec.hyper)
    for step in range(3):
        for p, q in zip(params, ref_params):
            g = torch.randn_like(p)
            if step == 1:  # a finite step, then a poisoned one, then finite again
                where = torch.randperm(p.numel())[: p.numel() // 7]
                values = [POISON[k] for k in (POISON if kind == "mixed" else [kind])]
                g[where] = torch.tensor(values, dtype=dtype).repeat(len(where))[: len(where)]
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol, equal_nan=True)
            assert torch.equal(p.isnan(), q.isnan()) and torch.equal(p.isinf(), q.isinf())
            for key in spec.state_keys:
                a, b = opt.state[p][key], ref.state[q][key]
                assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), key
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)
