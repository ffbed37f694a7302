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


# ---- the closure form: batch_output(model, batch) and output_loss(output, batch) -----------------

class DictModel(torch.nn.Module):
    """A Hugging Face style model: called with keyword tensors, a per-sample scale on the logits."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))

    def forward(self, features, scale):
        return self.net(features) * scale[:, None]


def dict_problem(seed: int, loss: str, sizes=(7, 5)):
    """Nested dict batches of different sizes, with a non-tensor leaf ("tag") and the labels
    beside the inputs; the closure pair that reads them."""
    torch.manual_seed(seed)
    model = DictModel().double()
    batches = []
    for b in sizes:
        labels = torch.randint(0, 4, (b,)) if loss == "cross_entropy" else torch.randn(b, 4, dtype=torch.float64)
        batches.append({"inputs": {"features": torch.randn(b, 3, dtype=torch.float64),
                                   "scale": torch.rand(b, dtype=torch.float64) + 0.5},
                        "labels": labels, "tag": "train"})
    batch_output = lambda m, b: m(**b["inputs"])  # noqa: E731
    output_loss = lambda out, b: LOSSES[loss](out, b["labels"])  # noqa: E731
    return model, batches, batch_output, output_loss


def sample_of(batch, i):
    """Sample i of a dict batch as a batch of one (dim 0 of every tensor leaf)."""
    if isinstance(batch, torch.Tensor):
        return batch[i:i + 1]
    if isinstance(batch, dict):
        return {k: sample_of(v, i) for k, v in batch.items()}
    return batch


@pytest.mark.parametrize("loss", list(LOSSES))
def test_ggn_closure_equals_jt_hout_j_per_batch(loss, seed):
    """Each batch counts once: G = mean over batches of J_b^T H_out,b J_b, dense per batch."""
    model, batches, batch_output, output_loss = dict_problem(seed, loss)
    theta = flat_params(model)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def output_of(t, batch):
        from torch.func import functional_call
        params, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            params[n] = t[i:i + k].view(s)
            i += k
        return functional_call(model, params, (), batch["inputs"])

    want = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for batch in batches:
        J = torch.autograd.functional.jacobian(lambda t: output_of(t, batch), theta).reshape(-1, theta.numel())
        out = output_of(theta, batch).detach()
        H_out = torch.autograd.functional.hessian(lambda o: output_loss(o.view_as(out), batch), out.reshape(-1))
        want += J.T @ H_out @ J / len(batches)
    op = GGNOperator(model, data=batches, batch_output=batch_output, output_loss=output_loss)
    torch.testing.assert_close(dense(op), want, rtol=1e-10, atol=1e-12)
    assert op.num_matvecs == theta.numel()


@pytest.mark.parametrize("loss", list(LOSSES))
def test_fisher_closure_equals_per_sample_outer_products(loss, seed):
    """Per-sample gradients over dim 0 of every tensor leaf of a nested dict batch: F = mean over
    batches of (1/B_b) sum_i g_i g_i^T, g_i taken one sample at a time."""
    model, batches, batch_output, output_loss = dict_problem(seed, loss)
    n = sum(p.numel() for p in model.parameters())
    want = torch.zeros(n, n, dtype=torch.float64)
    for batch in batches:
        size = len(batch["labels"])
        for i in range(size):
            one = sample_of(batch, i)
            grads = torch.autograd.grad(output_loss(batch_output(model, one), one), list(model.parameters()))
            g = torch.cat([t.reshape(-1) for t in grads])
            want += torch.outer(g, g) / size / len(batches)
    op = EmpiricalFisherOperator(model, data=batches, batch_output=batch_output, output_loss=output_loss)
    torch.testing.assert_close(dense(op), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [GGNOperator, EmpiricalFisherOperator])
def test_closure_form_equals_the_loss_fn_form_on_equal_batches(cls, seed):
    model, loss_fn, _, x, y = problem(seed, "cross_entropy")
    pairs = [(x[:6], y[:6]), (x[6:], y[6:])]
    dicts = [{"pixels": a, "labels": b} for a, b in pairs]
    op = cls(model, data=dicts, batch_output=lambda m, b: m(b["pixels"]),
             output_loss=lambda out, b: loss_fn(out, b["labels"]))
    torch.testing.assert_close(dense(op), dense(cls(model, loss_fn, pairs)), rtol=1e-10, atol=1e-12)


def count_gradients(model):
    """A list that grows by one each time autograd computes a gradient for a parameter."""
    seen = []
    for p in model.parameters():
        p.register_hook(lambda g: seen.append(1))
    return seen


BAD_CLOSURES = [
    (dict(batch_output=lambda m, b: m(**b["inputs"])), TypeError,
     r"closure form needs both batch_output and output_loss; output_loss is missing"),
    (dict(batch_output="model", output_loss=lambda o, b: o.sum()), TypeError,
     r"batch_output must be callable as batch_output\(model, batch\) -> output tensor; got str"),
    (dict(batch_output=lambda m, b: m(**b["inputs"]), output_loss=3), TypeError,
     r"output_loss must be callable as output_loss\(output, batch\) -> scalar loss; got int"),
    (dict(batch_output=lambda m, b: {"logits": m(**b["inputs"])}, output_loss=lambda o, b: o.sum()), ValueError,
     r"batch_output\(model, batch\) must return the model's output as a floating-point tensor "
     r"\(e.g. model\(\*\*batch\).logits\); got dict"),
    (dict(batch_output=lambda m, b: m(**b["inputs"]).argmax(1), output_loss=lambda o, b: o.sum()), ValueError,
     r"must return the model's output as a floating-point tensor .*got a tensor of shape \[7\], dtype torch.int64"),
    (dict(batch_output=lambda m, b: m(**b["inputs"]),
          output_loss=lambda o, b: torch.nn.functional.cross_entropy(o, b["labels"], reduction="none")), ValueError,
     r"output_loss\(output, batch\) must return a scalar floating-point loss; got a tensor of shape \[7\]"),
    (dict(batch_output=lambda m, b: m(**b["inputs"]), output_loss=lambda o, b: 1.5), ValueError,
     r"output_loss\(output, batch\) must return a scalar floating-point loss; got float"),
    (dict(batch_loss=lambda m, b: m(**b["inputs"]).sum()), TypeError,
     r"needs the model's output apart from the loss: instead of batch_loss, give batch_output"),
]


@pytest.mark.parametrize("cls", [GGNOperator, EmpiricalFisherOperator])
@pytest.mark.parametrize("case", range(len(BAD_CLOSURES)))
def test_a_bad_closure_is_refused_before_any_product(cls, case, seed):
    kwargs, error, message = BAD_CLOSURES[case]
    model, batches, _, _ = dict_problem(seed, "cross_entropy")
    seen = count_gradients(model)
    with pytest.raises(error, match=message):
        cls(model, data=batches, **kwargs)
    assert not seen  # no gradient, let alone a product, was computed
    with pytest.raises(TypeError, match="not both"):
        cls(model, torch.nn.functional.cross_entropy, batches, batch_output=lambda m, b: m(**b["inputs"]),
            output_loss=lambda o, b: o.sum())


@pytest.mark.parametrize("edit, message", [
    (lambda b: b["inputs"].update(scale=b["inputs"]["scale"][:4]),
     r"batch 1: the empirical Fisher takes per-sample gradients over dim 0 of every tensor in a batch, so their "
     r"sizes along dim 0 must agree; got \['inputs'\]\['features'\]: 5, \['inputs'\]\['scale'\]: 4, \['labels'\]: 5"),
    (lambda b: b.update(temperature=torch.tensor(2.0, dtype=torch.float64)),
     r"batch 1: \['temperature'\] is a 0-d tensor"),
])
def test_fisher_refuses_batches_without_one_batch_dimension(edit, message, seed):
    model, batches, batch_output, output_loss = dict_problem(seed, "cross_entropy")
    edit(batches[1])
    seen = count_gradients(model)
    with pytest.raises(ValueError, match=message):
        EmpiricalFisherOperator(model, data=batches, batch_output=batch_output, output_loss=output_loss)
    assert not seen
