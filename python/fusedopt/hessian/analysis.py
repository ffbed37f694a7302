"""analyze(): what the Hessian says about the point the model is at."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from .hvp import HessianOperator
from .lanczos import eigsh
from .stochastic import DensityResult, density

# A curvature counts as negative (positive) only beyond this fraction of the
# largest |eigenvalue|: tiny eigenvalues of either sign are rounding and
# sampling noise around the many flat directions of an over-parameterized net.
KIND_THRESHOLD = 1e-3


@dataclass
class HessianReport:
    """Result of :func:`analyze`.

    top_eigenvalues / bottom_eigenvalues: the k largest / smallest, ascending.
    grad_norm: ||gradient|| of the mean loss (a critical point has ~0).
    kind: with s = max(|lambda_max|, |lambda_min|) and t = KIND_THRESHOLD (1e-3):
        "minimum" if lambda_min >= -t s (no significant negative curvature),
        "maximum" if lambda_max <= t s (no significant positive curvature), else "saddle".
        (The label describes the curvature; it names a critical point only when grad_norm is small.)
    condition_number: lambda_max / lambda_min when lambda_min > t s, else inf.
    minimum_ratio: estimated fraction of positive eigenvalues (stochastic Lanczos quadrature).
    escape_direction: param-shaped unit eigenvector of lambda_min (descent direction of the
        curvature), None when kind == "minimum".
    num_hvps, seconds: total cost. density: the DensityResult used for minimum_ratio and plot().
    """
    top_eigenvalues: List[float]
    bottom_eigenvalues: List[float]
    grad_norm: float
    kind: str
    condition_number: float
    minimum_ratio: float
    escape_direction: Optional[List[torch.Tensor]]
    num_hvps: int
    seconds: float
    converged: bool
    density: DensityResult = field(repr=False)

    def __str__(self) -> str:
        f = lambda xs: ", ".join(f"{x:.4g}" for x in xs)  # noqa: E731
        lines = [
            f"Hessian report ({self.kind})",
            f"  top eigenvalues:    {f(self.top_eigenvalues)}",
            f"  bottom eigenvalues: {f(self.bottom_eigenvalues)}",
            f"  gradient norm:      {self.grad_norm:.4g}",
            f"  condition number:   {self.condition_number:.4g}",
            f"  minimum ratio:      {self.minimum_ratio:.3f} (fraction of positive eigenvalues)",
            f"  escape direction:   {'none (minimum)' if self.escape_direction is None else 'eigenvector of ' + format(self.bottom_eigenvalues[0], '.4g')}",
            f"  cost:               {self.num_hvps} HVPs, {self.seconds:.2f} s"
            + ("" if self.converged else "  (WARNING: some eigenvalues did not converge)"),
        ]
        return "\n".join(lines)

    def plot(self, path) -> None:
        """Writes a PNG of the spectral density (log scale) with the extreme eigenvalues marked."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError('report.plot needs matplotlib: pip install ".[plot]" from a fusedopt checkout, '
                              'or pip install matplotlib into an existing install') from e
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.semilogy(self.density.grid, np.maximum(self.density.density, 1e-12), color="tab:blue", label="density")
        for i, lam in enumerate(self.top_eigenvalues):
            ax.axvline(lam, color="tab:red", lw=0.8, label="top eigenvalues" if i == 0 else None)
        for i, lam in enumerate(self.bottom_eigenvalues):
            ax.axvline(lam, color="tab:green", lw=0.8, label="bottom eigenvalues" if i == 0 else None)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(f"Hessian spectrum: {self.kind}, minimum ratio {self.minimum_ratio:.3f}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def analyze(model, loss_fn, data, k: int = 5, *, tol: float = 1e-3, params=None, mode: str = "eval",
            density_runs: int = 4, density_steps: int = 40, seed: int = 0) -> HessianReport:
    """Top and bottom ``k`` eigenvalues, gradient norm, kind of point, condition number, minimum
    ratio and escape direction of the loss Hessian at the model's current parameters.

    ``data``, ``params``, ``mode``: as for :class:`HessianOperator`. ``tol``: eigsh tolerance.
    ``density_runs``/``density_steps``: stochastic Lanczos quadrature for the minimum ratio.
    Deterministic for a given ``seed`` (the same on every rank when distributed).
    """
    t0 = time.perf_counter()
    op = HessianOperator(model, loss_fn, data, params=params, mode=mode)
    k = min(k, op.shape[0])
    gen = torch.Generator()
    gen.manual_seed(seed)
    top = eigsh(op, k=k, which="LA", tol=tol, generator=gen)
    bottom = eigsh(op, k=k, which="SA", tol=tol, generator=gen)
    dens = density(op, num_runs=density_runs, num_steps=density_steps, seed=seed)
    grad_norm = float(op.gradient().norm())
    lmax, lmin = float(top.eigenvalues.max()), float(bottom.eigenvalues.min())
    scale = max(abs(lmax), abs(lmin))
    t = KIND_THRESHOLD * scale
    kind = "minimum" if lmin >= -t else ("maximum" if lmax <= t else "saddle")
    cond = lmax / lmin if lmin > t else float("inf")
    escape = None
    if kind != "minimum":
        escape = [x.detach().clone() for x in op.unflatten(bottom.eigenvectors[:, 0].to(op.dtype))]
    return HessianReport(
        top_eigenvalues=top.eigenvalues.tolist(), bottom_eigenvalues=bottom.eigenvalues.tolist(),
        grad_norm=grad_norm, kind=kind, condition_number=cond, minimum_ratio=dens.positive_fraction,
        escape_direction=escape, num_hvps=op.num_matvecs, seconds=time.perf_counter() - t0,
        converged=top.all_converged and bottom.all_converged, density=dens)
