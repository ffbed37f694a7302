"""A step with inf or nan grads does what the reference does, element for element:
the same values, and NaN/inf in the same places (params and state)."""
import pytest
import torch

from optim_registry import OPTIMIZERS, cases

POISON = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
# The finite elements at the dtype's precision: one step of fp32 math is a few
# roundings apart from torch's (or the fp64 reference's); fp64 math a few fp64 ones.
TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-14)}
# Muon: the spec's matrices join the flat params (its Newton-Schulz path steps only
# matrices; one nan or inf in a matrix's grad makes its whole update non-finite, in the
# reference too), and its lower-precision Newton-Schulz adds ``spec.update_rtol`` of the
# reference's largest finite update element per step.


@pytest.mark.parametrize("spec,dtype", cases(OPTIMIZERS, [torch.float32, torch.float64]))
@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "mixed"])
def test_nonfinite_grads_match_reference(spec, kind, dtype):
    rtol, atol = TOL[dtype]
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in [(37,), (1000,), *spec.matrices]]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = spec.make(params, **spec.hyper), spec.reference(ref_params, **spec.hyper)
    slack = [0.0] * len(params)
    for step in range(3):
        before = [q.detach().clone() for q in ref_params]
        for p, q in zip(params, ref_params):
            g = torch.randn_like(p)
            if step == 1:  # a finite step, then a poisoned one, then finite again
                where = torch.randperm(p.numel())[: p.numel() // 7]
                values = [POISON[k] for k in (POISON if kind == "mixed" else [kind])]
                g.view(-1)[where] = torch.tensor(values, dtype=dtype).repeat(len(where))[: len(where)]
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
        for i, (p, q) in enumerate(zip(params, ref_params)):
            moved = (q.detach() - before[i]).abs()
            moved = moved[moved.isfinite()]
            slack[i] += spec.update_rtol(p) * float(moved.max()) if moved.numel() else 0.0
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol + slack[i], equal_nan=True)
            assert torch.equal(p.isnan(), q.isnan()) and torch.equal(p.isinf(), q.isinf())
            for key in spec.keys_of(p):
                a, b = opt.state[p][key], ref.state[q][key]
                assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), key
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)
