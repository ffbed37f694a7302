"""The optimizer's own curvature (issue 15, first part): ``preconditioned(op, optimizer)``
against the dense ``P^-1/2 H P^-1/2`` built from the state's formula on a small fp64 model,
and ``stability_threshold`` against the formulas and against SGD's own dynamics on a quadratic."""
from __future__ import annotations

import math

import pytest
import torch

import fusedopt
from fusedopt.hessian import HessianOperator, eigsh, preconditioned, stability_threshold


def mlp_problem(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    return model, x, y, torch.nn.functional.cross_entropy


def train(model, opt, x, y, loss_fn, steps=3):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


def dense(op) -> torch.Tensor:
    n = op.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    return torch.stack([op.matvec(eye[i]) for i in range(n)], dim=1)


@pytest.mark.parametrize("cls,extra", [(fusedopt.Adam, {}), (fusedopt.AdamW, {"amsgrad": True}),
                                       (fusedopt.Adam, {"eps_inside_sqrt": True}), (fusedopt.LAMB, {})])
def test_preconditioned_equals_the_dense_formula(cls, extra, seed):
    model, x, y, loss_fn = mlp_problem(seed)
    opt = cls(model.parameters(), lr=1e-2, **extra)
    train(model, opt, x, y, loss_fn)
    op = HessianOperator(model, loss_fn, (x, y))
    pre = preconditioned(op, opt)
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    parts = []
    for p in model.parameters():
        st = opt.state[p]
        v = st["max_exp_avg_sq"] if extra.get("amsgrad") else st["exp_avg_sq"]
        v_hat = v / (1 - beta2 ** float(st["step"]))
        parts.append((v_hat + eps).sqrt() if extra.get("eps_inside_sqrt") else v_hat.sqrt() + eps)
    d = torch.cat([q.reshape(-1) for q in parts]).rsqrt()
    h = dense(HessianOperator(model, loss_fn, (x, y)))
    want = d[:, None] * h * d[None, :]
    got = dense(pre)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    top = eigsh(pre, k=1, which="LA", tol=1e-8).eigenvalues
    assert abs(float(top[0]) - float(torch.linalg.eigvalsh(want)[-1])) < 1e-6 * float(want.abs().max())


def test_momentum_optimizers_have_the_identity(seed):
    model, x, y, loss_fn = mlp_problem(seed)
    opt = fusedopt.SGD(model.parameters(), lr=0.1, momentum=0.9)
    op = HessianOperator(model, loss_fn, (x, y))
    v = torch.randn(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(preconditioned(op, opt).matvec(v), op.matvec(v), rtol=0, atol=0)


def test_bad_input_is_refused_before_any_product(seed):
    model, x, y, loss_fn = mlp_problem(seed)
    op = HessianOperator(model, loss_fn, (x, y))
    fresh = fusedopt.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"op.params\[0\] has no second moment .*no step taken"):
        preconditioned(op, fresh)
    other = fusedopt.Adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    with pytest.raises(ValueError, match=r"op.params\[0\] .* is not a parameter of the optimizer"):
        preconditioned(op, other)
    with pytest.raises(TypeError, match="fusedopt SGD, Adam, AdamW, LARS or LAMB"):
        preconditioned(op, torch.optim.Adam(model.parameters()))
    with pytest.raises(TypeError, match=r"op must have .params"):
        preconditioned(torch.eye(3), fresh)
    assert op.num_matvecs == 0


@pytest.mark.parametrize("hyper,want", [
    (dict(lr=0.1), 2 / 0.1),
    (dict(lr=0.1, momentum=0.9), 2 * 1.9 / 0.1),
    (dict(lr=0.05, momentum=0.5, dampening=0.5), 2 * 1.5 / (0.5 * 0.05)),
    (dict(lr=0.1, momentum=0.9, nesterov=True), 2 * 1.9 / (2.8 * 0.1)),
])
def test_sgd_threshold_is_where_sgd_on_a_quadratic_stops_converging(hyper, want):
    """fusedopt.SGD on 0.5 lambda x^2: |x| shrinks for lambda 2% under the threshold, grows 2% over."""
    assert math.isclose(stability_threshold(fusedopt.SGD([torch.nn.Parameter(torch.ones(1))], **hyper)), want)
    for factor, shrinks in ((0.98, True), (1.02, False)):
        x = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        opt = fusedopt.SGD([x], **hyper)
        lam = factor * want
        for _ in range(3000):
            x.grad = lam * x.detach()
            opt.step()
        assert (abs(float(x.detach())) < 1e-3) == shrinks, (factor, float(x.detach()))


def test_adam_threshold_and_groups():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = fusedopt.AdamW([p], lr=1e-3, betas=(0.9, 0.999))
    assert math.isclose(stability_threshold(opt), (2 + 2 * 0.9) / (0.1 * 1e-3))
    two = fusedopt.Adam([{"params": [p], "lr": 1e-3}, {"params": [q], "lr": 1e-2}])
    with pytest.raises(ValueError, match="pass group="):
        stability_threshold(two)
    assert math.isclose(stability_threshold(two, group=1), 3.8 / (0.1 * 1e-2))
    with pytest.raises(TypeError, match="LARS and LAMB"):
        stability_threshold(fusedopt.LAMB([p]))
