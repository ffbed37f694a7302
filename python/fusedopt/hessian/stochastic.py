"""Randomized spectral estimates: Hutchinson trace and stochastic Lanczos quadrature density."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .. import _kernels
from .operator import apply, apply_block, as_operator, basis_dtype


def _rademacher(n: int, dtype, device, generator) -> torch.Tensor:
    return (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(device=device, dtype=dtype)


# Probes per block product (op.matmat) where the operator has one; the numbers behind it are in
# trace()'s docstring.
DEFAULT_BLOCK_SIZE = 8
# density()'s default runs in flight keep their Lanczos vectors under this many bytes.
DENSITY_BLOCK_BYTES = 1 << 30


def _probes(n: int, count: int, dtype, device, generator) -> torch.Tensor:
    """``count`` Rademacher probes as the columns of an (n, count) tensor, drawn one after the
    other exactly as ``count`` calls of _rademacher would (the same vectors for a seed whatever
    the block size)."""
    return torch.stack([_rademacher(n, dtype, device, generator) for _ in range(count)], dim=1)


def _block_sizes(count: int, block_size: int):
    """count split into blocks of block_size (the last one shorter)."""
    while count > 0:
        yield min(block_size, count)
        count -= block_size


def _resolve_block_size(op, block_size) -> int:
    """block_size as given, or DEFAULT_BLOCK_SIZE for an operator with matmat (1 without: a
    loop of matvecs gains nothing from blocks and keeps more vectors in memory)."""
    if block_size is None:
        return DEFAULT_BLOCK_SIZE if callable(getattr(op, "matmat", None)) else 1
    _check_count("block_size", block_size, 1)
    return block_size


def _check_count(name: str, val, lo: int) -> None:
    if isinstance(val, bool) or not isinstance(val, int) or val < lo:
        raise ValueError(f"{name} must be an int >= {lo}; got {val!r}")


def _check_seed(seed) -> None:
    # int(seed) would silently truncate 1.5 and fail on "x" with a message not naming seed.
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise TypeError(f"seed must be an int or None; got {seed!r}")


def _generator(seed: Optional[int]) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g


def _mean_and_stderr(samples) -> tuple:
    """Mean of independent per-probe samples and its standard error: the sample standard
    deviation (ddof=1) over sqrt(number of samples); NaN with a single sample (no spread to see)."""
    s = np.asarray(samples, dtype=np.float64)
    se = float(s.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else float("nan")
    return float(s.mean()), se


@dataclass
class TraceResult:
    """A trace estimate (:func:`trace`): ``estimate``, ``stderr`` its standard error (of the
    Hutchinson part for hutch++), ``num_matvecs`` the operator products used."""
    estimate: float
    stderr: float
    num_matvecs: int


def trace(op, num_probes: int = 64, seed: Optional[int] = 0, method: str = "hutchinson",
          block_size: Optional[int] = None) -> TraceResult:
    """Stochastic trace estimate of a symmetric operator, ``num_probes`` operator products.

    - ``"hutchinson"`` (default): the mean of z^T A z over Rademacher probes z (entries +-1),
      E[z^T A z] = tr(A); ``stderr`` is the probes' standard deviation over sqrt(num_probes).
    - ``"hutch++"`` (Meyer, Musco, Musco, Woodruff 2021): a third of the products sketch the
      top of the spectrum (Q = orth(A S)), a third take tr(Q^T A Q) exactly, the rest run
      Hutchinson on the part of A orthogonal to Q. Much more accurate where a few large
      eigenvalues carry the trace (as in a network's Hessian): at the same number of products
      the error falls like 1/m instead of 1/sqrt(m); exact when A's rank is at most m/3.
      ``stderr`` is that of the Hutchinson part. Keeps m/3 vectors of n elements.

    ``block_size``: probes whose products are taken together, by one ``op.matmat`` of an
    (n, block_size) block where the operator has it (:class:`HessianOperator` batches the
    second backward over the block; the Fisher reuses its per-sample gradients), else by a
    loop of matvecs. The probes are the same for a seed whatever the block size (drawn in the
    same order), so the estimate changes only by rounding; ``num_matvecs`` counts one product
    per probe either way. Memory: block_size probes and products at a time (and for
    HessianOperator block_size times its second backward's intermediates). Default (None):
    ``DEFAULT_BLOCK_SIZE`` = 8 for an operator with matmat, 1 otherwise. Measured on CPU
    (benchmarks/bench_hessian.py --only-blocks, fp32, 16 Hutchinson probes, 2-core EPYC Zen 4
    VM shared with other jobs (load 1.5-3), speed-up over block_size=1, medians of 5
    interleaved repetitions, the range over two runs; the 2-thread rows were noisy):

    ==============================================  ========  ==========  ===========
    operator                                        threads   block 8     block 16
    ==============================================  ========  ==========  ===========
    Hessian, MLP 20-32-32-10 (2058 params, b 1024)  1         1.31-1.33x  1.37-1.39x
    Hessian, MLP                                    2         1.90-2.38x  2.15-3.01x
    Hessian, BatchNorm CNN (15,786 params, b 32)    1         1.22-1.26x  1.12-1.26x
    Hessian, BatchNorm CNN                          2         1.26-1.34x  1.11-1.33x
    GGN, MLP (batch 1024), one run                  1 / 2     1.80x/2.51x 1.79x/4.37x
    Fisher, MLP (batch 256)                         1         4.50-5.38x  9.43-11.62x
    Fisher, MLP                                     2         6.30-6.67x  11.80-12.85x
    ==============================================  ========  ==========  ===========

    Blocks paid in every case measured; 16 gained little over 8 for the Hessian (nothing on
    the CNN) at twice the memory, hence 8. The Fisher's product is its per-sample gradients,
    taken once per block, so its gain grows with the block: pass block_size=16 or more there.
    (density() uses the same block products; not timed separately.)

    Every rank of a distributed run must use the same ``seed`` (and block size).
    """
    op = as_operator(op)
    if method not in ("hutchinson", "hutch++"):
        raise ValueError(f"method must be 'hutchinson' or 'hutch++'; got {method!r}")
    _check_count("num_probes", num_probes, 2 if method == "hutchinson" else 4)
    _check_seed(seed)
    block = _resolve_block_size(op, block_size)
    n, dtype, g = op.shape[0], basis_dtype(op.dtype), _generator(seed)
    if method == "hutchinson":
        s = np.concatenate([_quadratic_forms(op, _probes(n, k, dtype, op.device, g))
                            for k in _block_sizes(num_probes, block)])
        return TraceResult(*_mean_and_stderr(s), num_probes)
    sketch = num_probes // 3
    Y = torch.cat([apply_block(op, _probes(n, k, dtype, op.device, g)) for k in _block_sizes(sketch, block)], dim=1)
    _check_finite(Y)
    Q = torch.linalg.qr(Y.to(torch.float64)).Q.to(dtype)  # n x sketch
    del Y
    top = float(sum(_quadratic_forms(op, Q[:, i:i + k]).sum()
                    for i, k in zip(range(0, sketch, block), _block_sizes(sketch, block))))

    def deflated(k):  # k probes with Q's directions removed
        Z = _probes(n, k, dtype, op.device, g)
        return Z - Q @ (Q.T @ Z)
    rest = np.concatenate([_quadratic_forms(op, deflated(k)) for k in _block_sizes(num_probes - 2 * sketch, block)])
    mean, stderr = _mean_and_stderr(rest)
    return TraceResult(top + mean, stderr, num_probes)


def _quadratic_forms(op, Z: torch.Tensor) -> np.ndarray:
    """[z^T A z for z in Z's columns] (one block product), fp64 on the host, checked finite."""
    out = (Z * apply_block(op, Z)).sum(0).to(torch.float64).cpu().numpy()
    if not np.isfinite(out).all():
        raise FloatingPointError("op.matvec returned a non-finite vector during trace estimation")
    return out


def _check_finite(t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError("op.matvec returned a non-finite vector during trace estimation")


def lanczos_tridiagonal(op, v: torch.Tensor, steps: int):
    """``steps`` Lanczos steps from v with full reorthogonalization; returns (alpha, beta) of T (numpy)."""
    return lanczos_tridiagonals(op, v[:, None], steps)[0]


def lanczos_tridiagonals(op, starts: torch.Tensor, steps: int) -> list:
    """Independent Lanczos runs from the columns of ``starts`` (n, r), in lockstep: step j of
    all runs still going takes one block product (:func:`apply_block`), then each run
    reorthogonalizes fully on its own vectors, exactly as a single run would. A run stops after
    ``steps`` steps or at a breakdown (beta <= 1e-10 max |alpha|); the others go on. Returns
    [(alpha, beta) of each run's T] (numpy). Memory: r times one run's ``steps`` vectors."""
    n, r = starts.shape
    steps = min(steps, n)
    V = torch.empty(r, steps, n, dtype=starts.dtype, device=starts.device)
    for q in range(r):
        V[q, 0].copy_(starts[:, q] / starts[:, q].norm())
    alphas, betas = [[] for _ in range(r)], [[] for _ in range(r)]
    active, j = list(range(r)), 0
    while active:
        W = apply_block(op, V[active, j].T)
        going = []
        for c, q in enumerate(active):
            w, Vq, alpha = W[:, c].contiguous(), V[q], alphas[q]
            h1 = _kernels.lanczos_dots(Vq, j + 1, w)
            _kernels.lanczos_orthogonalize(Vq, j + 1, w, h1)
            h2 = _kernels.lanczos_dots(Vq, j + 1, w)
            b = _kernels.lanczos_orthogonalize(Vq, j + 1, w, h2)
            cs = torch.cat([(h1 + h2)[j:], b]).cpu().numpy()  # one host sync per step and run
            if not np.isfinite(cs).all():
                raise FloatingPointError("op.matvec returned a non-finite vector during Lanczos")
            alpha.append(float(cs[0]))
            bj = float(cs[1])
            if j + 1 == steps or bj <= 1e-10 * max(abs(a) for a in alpha):
                continue
            betas[q].append(bj)
            Vq[j + 1].copy_(w / bj)
            going.append(q)
        active, j = going, j + 1
    return [(np.asarray(a), np.asarray(b)) for a, b in zip(alphas, betas)]


def _smoothed_mass(nodes, weights, sigma: float, lo: float, hi: float) -> np.ndarray:
    """Per run, the mass on (lo, hi) of the quadrature spread by Gaussians of width sigma:
    sum_i tau_i [Phi((hi - theta_i) / sigma) - Phi((lo - theta_i) / sigma)], Phi the normal CDF.

    This is the integral of the smoothed density that :func:`density` plots, taken exactly. It
    is used instead of counting the weights of the Ritz values in (lo, hi): with a few dozen
    Lanczos steps the Ritz values are spaced wider than sigma inside the spectrum, one of them
    carries the whole weight of the eigenvalues near a bound (often a large cluster at 0 in a
    network's Hessian), and which side of the bound it lands on flips with the probe and the
    step count: the count jumped between ~0.3 and ~0.73 per run for a true 0.52. The smoothed
    mass varies smoothly with the Ritz values instead."""
    out = []
    for theta, tau in zip(nodes, weights):
        t = torch.from_numpy(np.asarray(theta, dtype=np.float64))
        cdf = torch.special.ndtr((hi - t) / sigma) - torch.special.ndtr((lo - t) / sigma)
        out.append(float((torch.from_numpy(np.asarray(tau, dtype=np.float64)) * cdf).sum()))
    return np.asarray(out)


@dataclass
class DensityResult:
    """Spectral density estimate.

    grid: (num_points,) eigenvalue axis; density: values on the grid (Gaussian-smoothed,
    trapezoid integral over grid = 1); sigma: the smoothing width used.
    positive_fraction: estimated fraction of eigenvalues > 0, the mean over the runs (probes)
    of the smoothed density's mass on lambda > 0; positive_fraction_stderr: its standard error
    over the probes (NaN for one run). Eigenvalues within about sigma of 0 cannot be told from 0
    at this budget and count about half, a bias the standard error does not include;
    near_zero_fraction (the smoothed mass on [-sigma, sigma], mean over runs) says how much of
    the spectrum that concerns.
    nodes/weights: per-run Gauss nodes (Ritz values) and weights, for custom plots.
    """
    grid: np.ndarray
    density: np.ndarray
    positive_fraction: float
    positive_fraction_stderr: float
    near_zero_fraction: float
    sigma: float
    nodes: list
    weights: list
    num_matvecs: int


def density(op, num_runs: int = 10, num_steps: int = 80, num_points: int = 1000,
            sigma: Optional[float] = None, seed: Optional[int] = 0,
            block_size: Optional[int] = None) -> DensityResult:
    """Spectral density by stochastic Lanczos quadrature (Ubaru, Chen & Saad; Ghorbani et al.).

    Each run starts Lanczos (``num_steps`` steps, full reorthogonalization) from a normalized
    Rademacher vector (the probe); the Ritz values theta_i of the tridiagonal T with weights
    tau_i = u_i[0]^2 form a Gauss quadrature of the spectral measure. The density averages over
    runs the weights spread by Gaussians of width ``sigma`` (default 1% of the spectral range) on
    ``num_points`` grid points spanning the Ritz values plus 5 sigma on each side, renormalized
    to integrate to 1. ``positive_fraction`` is that smoothed density's mass on lambda > 0 (per
    run, then the mean over runs), with its standard error over the runs; see
    :class:`DensityResult` for what the smoothing does to eigenvalues near 0.
    The runs are independent, so the same ``seed`` with more runs adds probes to the same ones.
    Costs num_runs * num_steps matvecs and num_steps vectors of memory per run in flight.

    ``block_size``: runs done together, in lockstep (:func:`lanczos_tridiagonals`), step j of
    all of them by one ``op.matmat`` where the operator has it (see :func:`trace`); memory
    block_size times num_steps vectors. The runs and their probes are the same for a seed
    whatever the block size, so the result changes only by rounding (amplified by Lanczos's
    loss of orthogonality, which full reorthogonalization keeps small). Default (None):
    ``DEFAULT_BLOCK_SIZE`` runs at once for an operator with matmat, fewer where their Lanczos
    vectors (block * num_steps * n) would pass ``DENSITY_BLOCK_BYTES`` (1 GiB), 1 without matmat.
    """
    op = as_operator(op)
    for name, val, lo in (("num_runs", num_runs, 1), ("num_steps", num_steps, 1), ("num_points", num_points, 2)):
        _check_count(name, val, lo)
    _check_seed(seed)
    # Checked before the runs (not after them, wasting num_runs * num_steps matvecs); an inf
    # sigma used to give an all-NaN grid and density.
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float))
                              or not math.isfinite(sigma) or not sigma > 0):
        raise ValueError(f"sigma must be a positive finite number or None; got {sigma!r}")
    block = _resolve_block_size(op, block_size)
    n, dtype, g = op.shape[0], basis_dtype(op.dtype), _generator(seed)
    if block_size is None:  # the basis of every run in flight: keep the default's memory bounded
        per_run = min(num_steps, n) * n * torch.tensor([], dtype=dtype).element_size()
        block = max(1, min(block, DENSITY_BLOCK_BYTES // per_run))
    runs = [ab for k in _block_sizes(num_runs, block)
            for ab in lanczos_tridiagonals(op, _probes(n, k, dtype, op.device, g), num_steps)]
    nodes, weights, matvecs = [], [], 0
    for a, b in runs:
        matvecs += len(a)
        T = np.diag(a) + np.diag(b, 1) + np.diag(b, -1)
        theta, U = np.linalg.eigh(T)
        nodes.append(theta)
        weights.append(U[0, :] ** 2)
    lo = min(t.min() for t in nodes)
    hi = max(t.max() for t in nodes)
    span = max(hi - lo, 1e-12 * max(abs(hi), abs(lo), 1.0))
    s = float(sigma) if sigma is not None else 0.01 * span
    grid = np.linspace(lo - 5 * s, hi + 5 * s, num_points)
    dens = np.zeros(num_points)
    for t, w in zip(nodes, weights):
        dens += (w[None, :] * np.exp(-0.5 * ((grid[:, None] - t[None, :]) / s) ** 2)).sum(1)
    dens /= np.trapezoid(dens, grid) if hasattr(np, "trapezoid") else np.trapz(dens, grid)
    pos, pos_se = _mean_and_stderr(_smoothed_mass(nodes, weights, s, 0.0, math.inf))
    near_zero = float(_smoothed_mass(nodes, weights, s, -s, s).mean())
    return DensityResult(grid, dens, pos, pos_se, near_zero, s, nodes, weights, matvecs)
