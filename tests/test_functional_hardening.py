"""Hardening of tensor_norms and the Hessian API beyond the fuzz: bad input named
and nothing written, the same bits for any CPU thread count and run to run,
and non-finite products raised (never garbage eigenvalues)."""
import pytest
import torch

import fusedopt
from fusedopt.functional import tensor_norms
from fusedopt.hessian import HessianOperator, analyze, density, eigsh, trace


# ---- tensor_norms ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, exc, match", [
    (None, TypeError, r"tensors must be a list or tuple of tensors; got NoneType"),
    ([torch.randn(3), torch.empty(3, device="meta")], ValueError, r"tensors\[1\] is on meta"),
    ([torch.randn(3), torch.randn(3, dtype=torch.complex64)], TypeError, r"tensors\[1\] has dtype torch.complex64"),
    ([torch.randn(3).to_sparse()], TypeError, r"tensors\[0\] has layout torch.sparse_coo"),
    ([torch.randn(2), torch.randn(1).expand(4)], ValueError, r"tensors\[1\] is not contiguous"),
    ([torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)], ValueError, r"tensors\[0\] is not contiguous"),
    ([torch.ones(3, dtype=torch.bool)], TypeError, r"tensors\[0\] has dtype torch.bool"),
    ([torch.randn(3), [1.0]], TypeError, r"tensors\[1\] is a list; expected a torch.Tensor"),
])
def test_tensor_norms_rejects(bad, exc, match):
    before = [t.clone() if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.layout is torch.strided
              else None for t in (bad or [])]
    with pytest.raises(exc, match=match):
        tensor_norms(bad)
    for t, b in zip(bad or [], before):
        if b is not None:
            assert torch.equal(t, b)


def test_tensor_norms_aliased_inputs_are_read_only(seed):
    base = torch.randn(1000)
    ts = [base, base[10:500], base[10:500], base.view(10, 100)]  # the same memory several times
    copy = base.clone()
    out = tensor_norms(ts)
    assert torch.equal(base, copy)
    assert out[1] == out[2] and out[0] == out[3]


def test_tensor_norms_non_finite_like_torch():
    ts = [torch.tensor([1.0, float("inf")]), torch.tensor([float("nan"), 1.0]), torch.tensor([float("-inf")]),
          torch.full((5,), 3e19)]  # the fp32 sum of squares overflows, as in torch.linalg.vector_norm
    out = tensor_norms(ts)
    ref = torch.stack([torch.linalg.vector_norm(t) for t in ts])
    torch.testing.assert_close(out, ref, equal_nan=True)


def test_tensor_norms_bits_for_any_thread_count(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = [5 * 32768 + 17, 3 * 32768, 1, 0, 32767] + torch.randint(1, 3000, (60,), generator=gen).tolist()
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
    ts = [torch.randn(int(n), generator=gen).to(dtypes[i % 4]) for i, n in enumerate(sizes)]
    fusedopt.set_num_threads(1)
    first = tensor_norms(ts)
    for threads in (2, 3, 0, 1, 0):
        fusedopt.set_num_threads(threads)
        assert torch.equal(tensor_norms(ts), first), f"threads={threads}"


# ---- Hessian: validation, non-finite ----------------------------------------------------------

def sym(n, gen, dtype=torch.float64):
    M = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return ((M + M.T) / 2).to(dtype)


class Op:
    def __init__(self, A, **over):
        self.A, self.shape, self.dtype, self.device = A, tuple(A.shape), A.dtype, A.device
        self.__dict__.update(over)
        self.calls = 0

    def matvec(self, x):
        self.calls += 1
        return self.A @ x


@pytest.mark.parametrize("over, exc, match", [
    (dict(device=torch.device("meta")), ValueError, r"op.device must be a cpu or cuda device"),
    (dict(device="nowhere"), TypeError, r"op.device must be a torch.device"),
    (dict(dtype=torch.complex64), TypeError, r"op.dtype must be a real floating-point"),
    (dict(dtype=torch.int64), TypeError, r"op.dtype must be a real floating-point"),
    (dict(shape=(5, 4)), ValueError, r"op.shape must be \(n, n\)"),
    (dict(shape=(0, 0)), ValueError, r"op.shape must be \(n, n\)"),
])
@pytest.mark.parametrize("fn", ["eigsh", "trace", "density"])
def test_bad_operator_rejected_before_any_product(fn, over, exc, match, seed):
    op = Op(sym(5, torch.Generator().manual_seed(seed)), **over)
    with pytest.raises(exc, match=match):
        {"eigsh": eigsh, "trace": trace, "density": density}[fn](op)
    assert op.calls == 0


@pytest.mark.parametrize("v0, exc, match", [
    (torch.randn(6, dtype=torch.complex128), TypeError, r"v0 must be a real tensor"),
    (torch.randn(6).to_sparse(), TypeError, r"v0 must be a dense tensor"),
    (torch.empty(6, device="meta"), ValueError, r"v0 must be on a cpu or cuda device"),
    (torch.ones(6, dtype=torch.bool), TypeError, r"v0 must be a real tensor"),
    (torch.zeros(6), ValueError, r"v0 must be finite and nonzero"),
    (torch.full((6,), float("inf")), ValueError, r"v0 must be finite and nonzero"),
    (torch.randn(7), ValueError, r"v0 must be a tensor of 6 elements"),
])
def test_eigsh_bad_v0(v0, exc, match, seed):
    op = Op(sym(6, torch.Generator().manual_seed(seed)))
    with pytest.raises(exc, match=match):
        eigsh(op, k=2, v0=v0)
    assert op.calls == 0


def test_eigsh_max_matvecs_below_k(seed):
    with pytest.raises(ValueError, match=r"max_matvecs must be an int >= k \(k=3\)"):
        eigsh(sym(10, torch.Generator().manual_seed(seed)), k=3, max_matvecs=2)


@pytest.mark.parametrize("kw, match", [
    (dict(sigma=float("inf")), r"sigma must be a positive finite number"),
    (dict(sigma=0.0), r"sigma must be a positive finite number"),
    (dict(sigma="0.1"), r"sigma must be a positive finite number"),
    (dict(seed=1.5), r"seed must be an int or None"),
    (dict(seed="x"), r"seed must be an int or None"),
])
def test_density_bad_arguments_before_any_product(kw, match, seed):
    op = Op(sym(6, torch.Generator().manual_seed(seed)))
    with pytest.raises((ValueError, TypeError), match=match):
        density(op, num_runs=2, num_steps=4, **kw)
    assert op.calls == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("bad_at", [1, 4])
@pytest.mark.parametrize("fn", ["eigsh", "trace", "density"])
def test_non_finite_product_raises(fn, value, bad_at, seed):
    A = sym(30, torch.Generator().manual_seed(seed))

    class Bad(Op):
        def matvec(self, x):
            y = super().matvec(x)
            if self.calls >= bad_at:
                y = y.clone()
                y[7] = value
            return y

    with pytest.raises(FloatingPointError, match="non-finite"):
        {"eigsh": lambda op: eigsh(op, k=2, tol=1e-10), "trace": lambda op: trace(op, num_probes=8),
         "density": lambda op: density(op, num_runs=2, num_steps=10)}[fn](Bad(A))


def test_analyze_with_a_nan_parameter_raises(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="non-finite"):
        analyze(model, torch.nn.functional.mse_loss, (X, y), k=2)


@pytest.mark.filterwarnings("ignore:Complex modules:UserWarning")  # torch's note on complex modules
def test_hessian_operator_rejects_complex_params():
    model = torch.nn.Linear(2, 2).to(torch.complex64)
    op = HessianOperator(model, lambda out, y: out.abs().mean(), (torch.randn(3, 2, dtype=torch.complex64), None))
    with pytest.raises(TypeError, match="op.dtype must be a real floating-point"):
        eigsh(op, k=1)


# ---- Hessian: determinism ----------------------------------------------------------------------

def test_eigsh_trace_density_bits_for_any_thread_count(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 70_000  # several CPU chunks in the Lanczos dot/orthogonalize kernels
    d = torch.randn(n, generator=gen, dtype=torch.float64)

    class Diag:
        shape, dtype, device = (n, n), torch.float64, torch.device("cpu")

        def matvec(self, x):
            return d * x

    def run(threads):
        fusedopt.set_num_threads(threads)
        r = eigsh(Diag(), k=2, which="BE", tol=1e-6, max_matvecs=40, generator=torch.Generator().manual_seed(seed))
        t = trace(Diag(), num_probes=4, seed=seed)
        s = density(Diag(), num_runs=2, num_steps=8, num_points=50, seed=seed)
        return (r.eigenvalues.numpy().tobytes(), r.eigenvectors.numpy().tobytes(), r.residuals.numpy().tobytes(),
                t.estimate, t.stderr, s.density.tobytes(), s.positive_fraction)

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # capped at 40 products: may not converge
        first = run(1)
        for threads in (2, 0, 1, 0):
            assert run(threads) == first, f"threads={threads}"


def test_analyze_same_seed_same_report(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    a = analyze(model, torch.nn.functional.cross_entropy, (X, y), k=2, seed=seed + 1)
    b = analyze(model, torch.nn.functional.cross_entropy, (X, y), k=2, seed=seed + 1)
    assert (a.top_eigenvalues, a.bottom_eigenvalues, a.minimum_ratio) == (b.top_eigenvalues, b.bottom_eigenvalues,
                                                                          b.minimum_ratio)
    assert (a.density.density == b.density.density).all()
