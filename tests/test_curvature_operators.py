"""GGN and empirical Fisher operators (issue 15) against dense references on small fp64
models: J^T H_out J from the full Jacobian and the Hessian of the loss in the output, and
(1/N) sum_i g_i g_i^T from per-sample gradients taken one sample at a time."""
from __future__ import annotations

import pytest
import torch

from fusedopt.hessian import EmpiricalFisherOperator, GGNOperator, HessianOperator, eigsh

LOSSES = {"cross_entropy": torch.nn.functional.cross_entropy, "mse": torch.nn.functional.mse_loss}


def problem(seed: int, loss: str):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (12,)) if loss == "cross_entropy" else torch.randn(12, 4, dtype=torch.float64)
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]  # two batches of different sizes: weighted mean
    return model, LOSSES[loss], batches, x, y


def dense(op) -> torch.Tensor:
    eye = torch.eye(op.shape[0], dtype=torch.float64)
    return torch.stack([op.matvec(eye[i]) for i in range(op.shape[0])], dim=1)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def as_function(model):
    """f(theta) = model output with the flat parameters theta."""
    from torch.func import functional_call
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(theta, x):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            k = int(torch.tensor(s).prod()) if len(s) else 1
            params[n] = theta[i:i + k].view(s)
            i += k
        return functional_call(model, params, (x,))
    return f


@pytest.mark.parametrize("loss", list(LOSSES))
def test_ggn_equals_jt_hout_j(loss, seed):
    model, loss_fn, batches, x, y = problem(seed, loss)
    f, theta = as_function(model), flat_params(model)
    J = torch.autograd.functional.jacobian(lambda t: f(t, x), theta).reshape(-1, theta.numel())  # (B*C, n)
    out = f(theta, x).detach()
    H_out = torch.autograd.functional.hessian(lambda o: loss_fn(o.view_as(out), y), out.reshape(-1))
    want = J.T @ H_out @ J
    got = dense(GGNOperator(model, loss_fn, batches))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert float(torch.linalg.eigvalsh(got).min()) > -1e-12  # PSD


@pytest.mark.parametrize("loss", list(LOSSES))
def test_empirical_fisher_equals_per_sample_outer_products(loss, seed):
    model, loss_fn, batches, x, y = problem(seed, loss)
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    g = torch.stack(grads)
    want = g.T @ g / len(x)
    got = dense(EmpiricalFisherOperator(model, loss_fn, batches))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_ggn_is_the_hessian_of_a_linear_model_with_mse(seed):
    """A linear model's output Hessian term vanishes: GGN = Hessian exactly."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3).double()
    data = (torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64))
    loss_fn = torch.nn.functional.mse_loss
    torch.testing.assert_close(dense(GGNOperator(model, loss_fn, data)), dense(HessianOperator(model, loss_fn, data)),
                               rtol=1e-10, atol=1e-12)


def test_operators_work_with_eigsh_and_count_products(seed):
    model, loss_fn, batches, _, _ = problem(seed, "cross_entropy")
    for cls in (GGNOperator, EmpiricalFisherOperator):
        op = cls(model, loss_fn, batches)
        top = eigsh(op, k=1, which="LA", tol=1e-8)
        want = float(torch.linalg.eigvalsh(dense(cls(model, loss_fn, batches)))[-1])
        assert abs(float(top.eigenvalues[0]) - want) < 1e-6 * max(1.0, abs(want))
        assert op.num_matvecs == top.num_matvecs > 0


def test_fisher_needs_the_models_own_parameters(seed):
    """Refused at construction now (it was at the first matvec)."""
    model, loss_fn, batches, _, _ = problem(seed, "mse")
    stranger = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"params\[0\] is not a parameter of the model"):
        EmpiricalFisherOperator(model, loss_fn, batches, params=[stranger])


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, EmpiricalFisherOperator])
def test_a_parameter_block_by_name_is_the_dense_sub_block(cls, seed):
    model, loss_fn, batches, _, _ = problem(seed, "cross_entropy")
    full = dense(cls(model, loss_fn, batches))
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    starts, i = {}, 0
    for n, k in sizes.items():
        starts[n] = i
        i += k
    chosen = ["2.weight", "0.bias"]  # any order: coordinates follow it
    index = torch.cat([torch.arange(starts[n], starts[n] + sizes[n]) for n in chosen])
    block = dense(cls(model, loss_fn, batches, params=chosen))
    torch.testing.assert_close(block, full[index][:, index], rtol=1e-10, atol=1e-12)


def test_an_unknown_parameter_name_is_refused_before_any_product(seed):
    model, loss_fn, batches, _, _ = problem(seed, "mse")
    with pytest.raises(ValueError, match=r"params\[1\] is 'nope', not a parameter name of the model; its names "
                                         r"are 0.weight, 0.bias, 2.weight, 2.bias"):
        HessianOperator(model, loss_fn, batches, params=["0.weight", "nope"])


def test_batch_loss_closure_equals_the_loss_fn_form(seed):
    """Dict batches through batch_loss(model, batch) give the Hessian of the mean of the
    batch losses (each batch once): with equal batch sizes that of loss_fn's form."""
    model, loss_fn, _, x, y = problem(seed, "cross_entropy")
    pairs = [(x[:6], y[:6]), (x[6:], y[6:])]
    dicts = [{"pixels": a, "labels": b} for a, b in pairs]
    op = HessianOperator(model, data=dicts, batch_loss=lambda m, b: loss_fn(m(b["pixels"]), b["labels"]))
    torch.testing.assert_close(dense(op), dense(HessianOperator(model, loss_fn, pairs)), rtol=1e-10, atol=1e-12)


def test_bad_batch_loss_is_refused_before_any_product(seed):
    model, loss_fn, _, x, y = problem(seed, "mse")
    dicts = [{"x": x, "y": y}]
    with pytest.raises(ValueError, match=r"batch_loss\(model, batch\) must return a scalar floating-point loss; "
                                         r"got shape \[12, 4\]"):
        HessianOperator(model, data=dicts, batch_loss=lambda m, b: m(b["x"]))
    with pytest.raises(TypeError, match="not both"):
        HessianOperator(model, loss_fn, dicts, batch_loss=lambda m, b: m(b["x"]).sum())
    with pytest.raises(TypeError, match="GGNOperator needs the model's output apart from the loss: instead of "
                                        "batch_loss, give batch_output"):
        GGNOperator(model, data=dicts, batch_loss=lambda m, b: m(b["x"]).sum())


def decaying_matrix(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 2
    return (q * eig) @ q.T


def test_hutchpp_halves_hutchinsons_error_at_the_same_products(seed):
    """A spectrum decaying like 1/i^2 (a few eigenvalues carry the trace): at 60 products the
    RMS error of Hutch++ over 24 seeds is at most half of Hutchinson's; both count 60 products."""
    from fusedopt.hessian import MatrixOperator, trace
    a = decaying_matrix(150, seed)
    exact = float(torch.trace(a))
    errors = {"hutchinson": [], "hutch++": []}
    for s in range(24):
        for method in errors:
            op = MatrixOperator(a)
            r = trace(op, num_probes=60, seed=seed + s, method=method)
            assert r.num_matvecs == op.num_matvecs == 60
            errors[method].append((r.estimate - exact) ** 2)
    rms = {m: (sum(e) / len(e)) ** 0.5 for m, e in errors.items()}
    assert rms["hutch++"] <= 0.5 * rms["hutchinson"], rms


def test_hutchpp_is_exact_on_a_low_rank_matrix(seed):
    from fusedopt.hessian import trace
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(80, 5, generator=gen, dtype=torch.float64)
    a = u @ u.T  # rank 5 <= 24 // 3
    r = trace(a, num_probes=24, seed=seed, method="hutch++")
    assert abs(r.estimate - float(torch.trace(a))) < 1e-9 * float(torch.trace(a))
    with pytest.raises(ValueError, match="method must be 'hutchinson' or 'hutch\\+\\+'"):
        trace(a, method="girard")
