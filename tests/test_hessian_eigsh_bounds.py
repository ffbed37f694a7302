"""What eigsh's ``converged`` promises (issue 15), checked against the dense spectrum over many
seeds: the residual ``||A x - l x||`` bounds the distance from each returned value to the nearest
eigenvalue (Weyl), ``converged`` is exactly ``residual <= tol * max(|l|, eps ||T||)``, and the
residuals are those of the returned vectors. Spectra: random, clustered, a small gap, a dominant
negative end; which LA, SA, LM; a loose and a tight tol."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fusedopt.hessian import eigsh


def random_symmetric(evals, g):
    n = len(evals)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    return Q @ torch.diag(evals) @ Q.T


def spectrum(name, n, g):
    if name == "random":
        return torch.randn(n, dtype=torch.float64, generator=g) * 3
    if name == "clustered":  # four values 1e-3 apart (relative) at each end
        return torch.cat([10 * (1 + 1e-3 * torch.arange(4.0)), torch.linspace(-1, 1, n - 8),
                          -10 * (1 + 1e-3 * torch.arange(4.0))]).double()
    if name == "small_gap":  # top two 1e-3 apart above a bulk
        return torch.cat([torch.tensor([1.0, 1 - 1e-3]), 0.9 * torch.rand(n - 2, generator=g)]).double()
    if name == "negative":  # the largest magnitude is negative
        return torch.cat([torch.tensor([-8.0, -7.5]), torch.linspace(-3, 5, n - 2)]).double()
    raise KeyError(name)


@pytest.mark.parametrize("name", ["random", "clustered", "small_gap", "negative"])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("tol", [1e-3, 1e-8])
def test_residual_bounds_the_eigenvalue_error(name, which, tol, seed):
    eps = float(np.finfo(np.float64).eps)
    for i in range(10):
        g = torch.Generator().manual_seed(seed + 7919 * i)
        A = random_symmetric(spectrum(name, 80, g), g)
        exact = torch.linalg.eigvalsh(A).numpy()
        scale = float(np.abs(exact).max())
        for k in (1, 3):
            res = eigsh(A, k=k, which=which, tol=tol, generator=g)
            got, r = res.eigenvalues.numpy(), res.residuals.numpy()
            ctx = (name, which, tol, i, k, got, r)
            nearest = np.abs(got[:, None] - exact[None, :]).min(axis=1)
            assert np.all(nearest <= r + 1e-13 * scale), ctx
            # the residuals are those of the returned unit vectors
            X = res.eigenvectors
            true_r = (A @ X - X * res.eigenvalues).norm(dim=0).numpy()
            assert np.all(true_r <= r + 1e-12 * scale), ctx
            floor = eps * np.abs(got).max()  # ||T|| >= the largest returned |value|
            assert res.all_converged, ctx
            assert np.all(r <= tol * np.maximum(np.abs(got), floor) + 1e-12 * scale), ctx
            assert np.all(nearest <= tol * np.abs(got) + 1e-12 * scale), ctx
