"""analyze(): what the Hessian says about the point the model is at."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from .hvp import HessianOperator
from .lanczos import eigsh
from .stochastic import DensityResult, _check_count, density

# An extreme eigenvalue counts as flat (not a direction of curvature) when |lambda| is at most
# this fraction of the largest |eigenvalue|: tiny eigenvalues of either sign are rounding and
# sampling noise around the many flat directions of an over-parameterized net.
KIND_THRESHOLD = 1e-3

# The kinds analyze() reports (see HessianReport.kind).
KINDS = ("minimum", "minimum (flat directions)", "saddle", "maximum (flat directions)", "maximum", "degenerate")

# The plot masks the density where it is below this fraction of its peak: on a log axis the
# Gaussian tails of the smoothing would otherwise run down many decades, and a clipping floor
# drawn at a fixed value looked like a plateau of eigenvalues.
PLOT_FLOOR = 1e-6


def _check_real(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number; got {x!r}")
    return float(x)


def classify(lambda_max: float, lambda_min: float, err_max: float = 0.0, err_min: float = 0.0) -> str:
    """Kind of curvature from the extreme eigenvalues and the error bounds of their estimates.

    An extreme eigenvalue is *significant* when |lambda| exceeds both KIND_THRESHOLD times
    max(|lambda_max|, |lambda_min|) and its error (a true eigenvalue lies within err of the
    estimate, so a smaller |lambda| may as well be 0); otherwise it is *flat*.
        "saddle"                     lambda_max > 0 and lambda_min < 0, both significant;
        "minimum"                    lambda_min > 0 significant (all curvature clearly positive);
        "minimum (flat directions)"  lambda_max > 0 significant, lambda_min flat (either sign);
        "maximum", "maximum (flat directions)": the same with the signs reversed;
        "degenerate"                 neither end significant (no curvature beyond the error).
    """
    lmax, lmin = _check_real("lambda_max", lambda_max), _check_real("lambda_min", lambda_min)
    emax, emin = _check_real("err_max", err_max), _check_real("err_min", err_min)
    if lmax < lmin or emax < 0 or emin < 0:
        raise ValueError(f"need lambda_max >= lambda_min and errors >= 0; got lambda_max={lmax}, "
                         f"lambda_min={lmin}, err_max={emax}, err_min={emin}")
    floor = KIND_THRESHOLD * max(abs(lmax), abs(lmin))

    def significant(lam, err):
        return abs(lam) > max(floor, err)

    positive = lmax > 0 and significant(lmax, emax)
    negative = lmin < 0 and significant(lmin, emin)
    if positive and negative:
        return "saddle"
    if positive:
        return "minimum" if lmin > 0 and significant(lmin, emin) else "minimum (flat directions)"
    if negative:
        return "maximum" if lmax < 0 and significant(lmax, emax) else "maximum (flat directions)"
    return "degenerate"


def _condition(lmax: float, lmin: float):
    """(max(|lambda_max|, |lambda_min|) / min(...), the ratio as text, the signs as text)."""
    big, small = (("lambda_max", lmax), ("lambda_min", lmin)) if abs(lmax) >= abs(lmin) else \
        (("lambda_min", lmin), ("lambda_max", lmax))
    ratio = abs(big[1]) / abs(small[1]) if small[1] != 0 else float("inf")
    rel = lambda x: ">" if x > 0 else ("<" if x < 0 else "=")  # noqa: E731
    return ratio, f"|{big[0]}| / |{small[0]}|", f"lambda_max {rel(lmax)} 0, lambda_min {rel(lmin)} 0"


def _plus_minus(x: float, se: float) -> str:
    return f"{x:.3f} +/- {se:.3f}" if math.isfinite(se) else f"{x:.3f} (no standard error from one probe)"


@dataclass
class HessianReport:
    """Result of :func:`analyze`.

    top_eigenvalues: the k largest, largest first; bottom_eigenvalues: the k smallest, smallest
        first (each list starts at its end of the spectrum).
    top_errors / bottom_errors: Lanczos residuals ||H x - lambda x|| of those pairs: a true
        eigenvalue lies within that distance of each value.
    loss: mean loss over the data at these parameters; grad_norm: ||gradient|| of it
        (a critical point has ~0). num_params: parameters (the Hessian is num_params^2).
    kind: one of KINDS, from lambda_max, lambda_min and their errors by :func:`classify`:
        an end counts as flat when |lambda| <= KIND_THRESHOLD (1e-3) * max |lambda| or within
        its error of 0. (The label describes the curvature; it names a critical point only when
        grad_norm is small.)
    condition_number: max(|lambda_max|, |lambda_min|) / min(|lambda_max|, |lambda_min|), inf only
        when an end is exactly 0; condition_signs says the signs ("lambda_max > 0, lambda_min < 0").
        For a minimum it is the usual lambda_max / lambda_min; for a saddle it compares the
        curvature on the two sides (when lambda_max dominates: at step size 1 / lambda_max,
        gradient descent leaves the saddle along lambda_min by a factor e about every
        condition_number steps), not the distance to singularity, which would need the
        eigenvalue nearest 0.
    minimum_ratio, minimum_ratio_stderr: estimated fraction of positive eigenvalues and its
        standard error over the probes (DensityResult.positive_fraction; eigenvalues within the
        smoothing width of 0 count about half, see density.near_zero_fraction).
    escape_direction: param-shaped unit eigenvector of lambda_min (descent direction of the
        curvature) when lambda_min is significantly negative, else None.
    num_hvps, seconds: total cost. density: the DensityResult used for minimum_ratio and plot().
    """
    top_eigenvalues: List[float]
    bottom_eigenvalues: List[float]
    top_errors: List[float]
    bottom_errors: List[float]
    loss: float
    grad_norm: float
    num_params: int
    kind: str
    condition_number: float
    condition_signs: str
    minimum_ratio: float
    minimum_ratio_stderr: float
    escape_direction: Optional[List[torch.Tensor]]
    num_hvps: int
    seconds: float
    converged: bool
    density: DensityResult = field(repr=False)

    def __str__(self) -> str:
        f = lambda xs: ", ".join(f"{x:.4g}" for x in xs)  # noqa: E731
        lmax, lmin = self.top_eigenvalues[0], self.bottom_eigenvalues[0]
        _, ratio_text, _ = _condition(lmax, lmin)
        runs = len(self.density.nodes)
        lines = [
            f"Hessian report ({self.kind})",
            f"  loss:               {self.loss:.6g} (mean over the data)",
            f"  top eigenvalues:    {f(self.top_eigenvalues)} (largest first)",
            f"  bottom eigenvalues: {f(self.bottom_eigenvalues)} (smallest first)",
            f"  gradient norm:      {self.grad_norm:.4g}",
            f"  condition number:   {self.condition_number:.4g} = {ratio_text} ({self.condition_signs})",
            f"  minimum ratio:      {_plus_minus(self.minimum_ratio, self.minimum_ratio_stderr)} "
            f"(fraction of positive eigenvalues; standard error over {runs} probes)",
            f"                      {100 * self.density.near_zero_fraction:.0f}% of the spectrum lies within "
            f"sigma={self.density.sigma:.3g} of 0 and counts about half",
            f"  escape direction:   "
            + ("none (no significant negative curvature)" if self.escape_direction is None
               else "eigenvector of " + format(lmin, ".4g")),
            f"  cost:               {self.num_params} parameters, {self.num_hvps} HVPs, {self.seconds:.2f} s"
            + ("" if self.converged else "  (WARNING: some eigenvalues did not converge)"),
        ]
        return "\n".join(lines)

    def figure(self):
        """A matplotlib Figure of the spectral density (log scale) with the extreme eigenvalues marked.

        The density is masked (not drawn) where it is below PLOT_FLOOR times its peak, the
        y axis starts at that floor, the legend sits outside the axes, and the title gives the
        kind, the minimum ratio with its standard error, the parameter count and the smoothing
        width sigma. Built without pyplot, so it changes no global matplotlib state.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError('report.plot needs matplotlib: pip install ".[plot]" from a fusedopt checkout, '
                              'or pip install matplotlib into an existing install') from e
        d = self.density
        floor = PLOT_FLOOR * float(d.density.max())
        curve = np.ma.masked_less(d.density, floor)
        fig = Figure(figsize=(8, 4), layout="constrained")
        ax = fig.add_subplot()
        ax.semilogy(d.grid, curve, color="tab:blue", label="density")
        for i, lam in enumerate(self.top_eigenvalues):
            ax.axvline(lam, color="tab:red", lw=0.8, label="top eigenvalues" if i == 0 else None)
        for i, lam in enumerate(self.bottom_eigenvalues):
            ax.axvline(lam, color="tab:green", lw=0.8, label="bottom eigenvalues" if i == 0 else None)
        ax.set_ylim(bottom=floor)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel(f"density (masked below {PLOT_FLOOR:g} x peak)")
        ax.set_title(f"Hessian spectrum: {self.kind}, minimum ratio "
                     f"{_plus_minus(self.minimum_ratio, self.minimum_ratio_stderr)}\n"
                     f"{self.num_params} parameters, smoothing sigma = {d.sigma:.3g}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        return fig

    def plot(self, path) -> None:
        """Writes :meth:`figure` as a PNG to ``path``."""
        self.figure().savefig(path, dpi=110)


def analyze(model, loss_fn, data, k: int = 5, *, tol: float = 1e-3, params=None, mode: str = "eval",
            density_runs: int = 8, density_steps: int = 40, seed: int = 0, method: str = "auto") -> HessianReport:
    """Top and bottom ``k`` eigenvalues, loss, gradient norm, kind of point, condition number,
    minimum ratio (with its standard error) and escape direction of the loss Hessian at the
    model's current parameters.

    ``data``, ``params``, ``mode``, ``method``: as for :class:`HessianOperator`. ``tol``: eigsh tolerance.
    ``density_runs``/``density_steps``: stochastic Lanczos quadrature for the minimum ratio; it
    equals ``density(op, num_runs=density_runs, num_steps=density_steps, seed=seed)``'s
    positive_fraction exactly (the same probes and the same estimator).
    Deterministic for a given ``seed`` (the same on every rank when distributed).
    """
    # Checked before any HVP (eigsh and density would check these only after work was done).
    _check_count("k", k, 1)
    _check_count("density_runs", density_runs, 1)
    _check_count("density_steps", density_steps, 1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int; got {seed!r}")
    t0 = time.perf_counter()
    op = HessianOperator(model, loss_fn, data, params=params, mode=mode, method=method)
    k = min(k, op.shape[0])
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    top = eigsh(op, k=k, which="LA", tol=tol, generator=gen)
    bottom = eigsh(op, k=k, which="SA", tol=tol, generator=gen)
    dens = density(op, num_runs=density_runs, num_steps=density_steps, seed=seed)
    loss, grad = op.loss_and_gradient()
    # eigsh returns ascending values; each list here starts at its end of the spectrum.
    down = torch.arange(k - 1, -1, -1)
    top_vals, top_err = top.eigenvalues[down].tolist(), top.residuals[down].tolist()
    bottom_vals, bottom_err = bottom.eigenvalues.tolist(), bottom.residuals.tolist()
    lmax, lmin = top_vals[0], bottom_vals[0]
    # max/min: two unconverged runs (separate start vectors) need not have lmax >= lmin.
    kind = classify(max(lmax, lmin), min(lmax, lmin), top_err[0], bottom_err[0])
    cond, _, signs = _condition(lmax, lmin)
    escape = None
    if kind == "saddle" or kind.startswith("maximum"):
        escape = [x.detach().clone() for x in op.unflatten(bottom.eigenvectors[:, 0].to(op.dtype))]
    return HessianReport(
        top_eigenvalues=top_vals, bottom_eigenvalues=bottom_vals, top_errors=top_err, bottom_errors=bottom_err,
        loss=loss, grad_norm=float(grad.norm()), num_params=op.shape[0], kind=kind, condition_number=cond,
        condition_signs=signs, minimum_ratio=dens.positive_fraction,
        minimum_ratio_stderr=dens.positive_fraction_stderr, escape_direction=escape, num_hvps=op.num_matvecs,
        seconds=time.perf_counter() - t0, converged=top.all_converged and bottom.all_converged, density=dens)
