import warnings

import numpy as np
import pytest
import torch

from fusedopt import _kernels
from fusedopt.hessian import HessianOperator, density, eigsh, trace

WHICH = ["LA", "SA", "LM", "BE"]


def expected(evals, k, which):
    e = evals.numpy()
    if which == "LA":
        sel = np.sort(e)[-k:]
    elif which == "SA":
        sel = np.sort(e)[:k]
    elif which == "LM":
        sel = e[np.argsort(-np.abs(e), kind="stable")[:k]]
    else:
        s = np.sort(e)
        sel = np.concatenate([s[:k // 2], s[len(s) - (k - k // 2):]])
    return np.sort(sel)


def spectrum(name, n, g):
    if name == "separated":
        return torch.logspace(0, 2, n, dtype=torch.float64) * torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0).double()
    if name == "clustered":
        return torch.cat([10 + 1e-3 * torch.arange(4.0), torch.linspace(-1, 1, n - 8), -9.5 - 1e-3 * torch.arange(4.0)]).double()
    if name == "repeated":
        return torch.cat([torch.full((3,), 7.0), torch.linspace(-2, 3, n - 6), torch.full((3,), -6.0)]).double()
    raise KeyError(name)


def random_symmetric(evals, g):
    n = len(evals)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    A = Q @ torch.diag(evals) @ Q.T
    return (A + A.T) / 2


def check(A, res, k, which, rtol=1e-8):
    evals = torch.linalg.eigvalsh(A)
    exp = expected(evals, k, which)
    got = res.eigenvalues.numpy()
    assert res.converged.all()
    np.testing.assert_allclose(got, exp, rtol=rtol, atol=rtol * float(evals.abs().max()))
    X = res.eigenvectors
    # eigenvectors: residual small, orthonormal (no ghost duplicates)
    R = A @ X - X * res.eigenvalues.to(X.dtype)
    assert float(R.norm(dim=0).max()) <= 1e-6 * float(evals.abs().max())
    np.testing.assert_allclose((X.T @ X).numpy(), np.eye(k), atol=1e-8)
    # up to sign, versus the dense eigenvectors where the eigenvalue is simple
    w, Q = torch.linalg.eigh(A)
    for i, lam in enumerate(got):
        gaps = (w - lam).abs()
        j = int(gaps.argmin())
        if float(torch.sort(gaps).values[1]) > 1e-4 * float(w.abs().max()):
            assert min(float((X[:, i] - Q[:, j]).abs().max()), float((X[:, i] + Q[:, j]).abs().max())) < 1e-6


@pytest.mark.parametrize("which", WHICH)
def test_diagonal(which, seed):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(120, dtype=torch.float64, generator=g) * 5
    A = torch.diag(d)
    check(A, eigsh(A, k=4, which=which, tol=1e-10, generator=g), 4, which)


@pytest.mark.parametrize("name", ["separated", "clustered", "repeated"])
@pytest.mark.parametrize("which", WHICH)
def test_known_spectra(name, which, seed):
    g = torch.Generator().manual_seed(seed)
    A = random_symmetric(spectrum(name, 100, g), g)
    k = 5
    res = eigsh(A, k=k, which=which, tol=1e-10, generator=g, multiplicity_check=(name != "separated"))
    check(A, res, k, which)


def small_mlp_problem():
    """A small model and data drawn from the global RNG (seeded per test by conftest's `seed`)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    X = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    return model, torch.nn.functional.cross_entropy, X, y


def dense_hessian(model, loss_fn, X, y):
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def f(flat):
        out, i = {}, 0
        for (name, p), s in zip(model.named_parameters(), shapes):
            out[name] = flat[i:i + p.numel()].view(s)
            i += p.numel()
        return loss_fn(torch.func.functional_call(model, out, (X,)), y)

    return torch.autograd.functional.hessian(f, flat0)


@pytest.mark.parametrize("which", WHICH)
def test_mlp_hessian_matches_dense(which):
    model, loss_fn, X, y = small_mlp_problem()
    H = dense_hessian(model, loss_fn, X, y)
    op = HessianOperator(model, loss_fn, [(X[:15], y[:15]), (X[15:], y[15:])])  # weighted mean over batches
    v = torch.randn(op.shape[0], dtype=torch.float64)
    Hv = H @ v  # fp64 both ways: equal to fp64 rounding of the vector's scale
    torch.testing.assert_close(op.matvec(v), Hv, rtol=1e-12, atol=1e-12 * float(Hv.abs().max()))
    res = eigsh(op, k=3, which=which, tol=1e-10)
    check(H, res, 3, which)
    assert op.num_matvecs == res.num_matvecs + 1


def test_trace_and_density_known_spectrum(seed):
    g = torch.Generator().manual_seed(seed)
    evals = torch.cat([torch.linspace(-1, 0.0, 60)[:-1], torch.linspace(0.05, 4, 241)]).double()
    A = random_symmetric(evals, g)
    t = trace(A, num_probes=60, seed=seed + 1)
    assert abs(t.estimate - float(evals.sum())) <= 3 * t.stderr
    d = density(A, num_runs=8, num_steps=40)
    assert abs(np.trapezoid(d.density, d.grid) - 1) < 1e-6
    exact = float((evals > 0).double().mean())
    assert abs(d.positive_fraction - exact) < 0.05


def test_non_finite_hvp_raises():
    class Bad:
        shape, dtype, device = (10, 10), torch.float64, torch.device("cpu")
        def matvec(self, x):
            return torch.full_like(x, float("nan"))
    with pytest.raises(FloatingPointError):
        eigsh(Bad())


def test_unconverged_is_flagged(seed):
    A = random_symmetric(torch.linspace(0, 1, 200).double(), torch.Generator().manual_seed(seed))
    with pytest.warns(RuntimeWarning):
        res = eigsh(A, k=3, tol=1e-12, max_matvecs=8)
    assert not res.converged.all()


def test_v0_warm_start_and_validation(seed):
    A = random_symmetric(torch.linspace(-1, 5, 80).double(), torch.Generator().manual_seed(seed))
    first = eigsh(A, k=1, tol=1e-8)
    warm = eigsh(A, k=1, tol=1e-8, v0=first.eigenvectors[:, 0])
    assert warm.num_matvecs <= 2
    with pytest.raises(ValueError, match="which"):
        eigsh(A, which="XX")
    with pytest.raises(ValueError, match="k must"):
        eigsh(A, k=0)
    with pytest.raises(ValueError, match="ncv"):
        eigsh(A, k=5, ncv=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 1000, 70001])
def test_kernels_match_torch(dtype, n):
    V = torch.randn(7, n, dtype=dtype)
    w = torch.randn(n, dtype=dtype)
    ref = V[:5].double() @ w.double()
    got = _kernels.lanczos_dots(V, 5, w)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-10)
    assert torch.equal(got, _kernels.lanczos_dots(V, 5, w))  # deterministic
    h = torch.randn(5, dtype=torch.float64)
    w2 = w.clone()
    nrm = _kernels.lanczos_orthogonalize(V, 5, w2, h)
    refw = (w.double() - V[:5].double().T @ h)
    tol = 1e-12 if dtype is torch.float64 else 1e-5
    torch.testing.assert_close(w2.double(), refw, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(nrm[0], w2.double().norm(), rtol=1e-12, atol=0)


def test_kernel_validation():
    V = torch.randn(3, 10)
    with pytest.raises(ValueError, match="w must"):
        _kernels.lanczos_dots(V, 2, torch.randn(9))
    with pytest.raises(ValueError, match="rows"):
        _kernels.lanczos_dots(V, 4, torch.randn(10))
    with pytest.raises(TypeError, match="float32 and float64"):
        _kernels.lanczos_dots(V.half(), 2, torch.randn(10).half())


@pytest.mark.cuda
@pytest.mark.cuda
def test_kernels_cuda_match_cpu():
    V = torch.randn(9, 100003, dtype=torch.float64)
    w = torch.randn(100003, dtype=torch.float64)
    h = torch.randn(9, dtype=torch.float64)
    torch.testing.assert_close(_kernels.lanczos_dots(V.cuda(), 9, w.cuda()).cpu(), V @ w, rtol=1e-12, atol=1e-9)
    w2 = w.cuda()
    n2 = _kernels.lanczos_orthogonalize(V.cuda(), 9, w2, h.cuda())
    torch.testing.assert_close(w2.cpu(), w - V.T @ h, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(n2.cpu()[0], (w - V.T @ h).norm(), rtol=1e-12, atol=0)


# LM's last place contested by both ends: -1.02 (low end) against 1.0 (high end). Before each
# end's next candidate was kept at a restart, ncv = k + 3 converged to 1.0 in ~10% of the start
# vectors (found by tests/test_fuzz_functional.py).
CONTESTED_LM = {
    3: torch.cat([torch.tensor([-3.0, -2.0, -1.02]), torch.linspace(-1.0, 0.0, 25), torch.tensor([1.0])]),
    4: torch.cat([torch.tensor([-3.0, -2.9, -2.8, -1.02]), torch.linspace(-0.95, 0.0, 25), torch.tensor([1.0])]),
}


@pytest.mark.parametrize("k", sorted(CONTESTED_LM))
def test_lm_contested_last_place_small_basis(k, seed):
    evals = CONTESTED_LM[k].double()
    for i in range(40):
        g = torch.Generator().manual_seed(seed + i)
        A = random_symmetric(evals, g)
        res = eigsh(A, k=k, which="LM", tol=1e-10, ncv=k + 3, generator=g)
        assert res.all_converged
        np.testing.assert_allclose(res.eigenvalues.numpy(), expected(evals, k, "LM"), rtol=0, atol=1e-8,
                                   err_msg=f"start vector {seed + i}")


def test_lm_basis_too_small_warns(seed):
    A = random_symmetric(CONTESTED_LM[3].double(), torch.Generator().manual_seed(seed))
    with pytest.warns(UserWarning, match="ncv=5 < k \\+ 3"):
        eigsh(A, k=3, which="LM", tol=1e-8, ncv=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # (a RuntimeWarning is not one)
        eigsh(A, k=3, which="LM", tol=1e-8)  # default basis
        eigsh(A, k=1, which="LA", tol=1e-8, ncv=4)  # one end only: no contest
        eigsh(A[:5, :5], k=3, which="LM", ncv=5)  # the whole space
