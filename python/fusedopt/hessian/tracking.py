"""Sharpness during training: the top eigenvalue(s) of the loss Hessian (or of the optimizer's
preconditioned Hessian) step after step, each estimate warm-started from the last eigenvectors,
next to the optimizer's stability threshold (:func:`stability_threshold`)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

import torch

from .hvp import HessianOperator
from .lanczos import eigsh
from .preconditioned import preconditioned as precondition, stability_threshold


@dataclass
class SharpnessRecord:
    """One estimate: ``sharpness`` the top eigenvalues (largest first), ``threshold`` the
    optimizer's (None without one, or for LARS/LAMB), ``num_hvps`` the operator products it
    took, ``seconds`` its wall time, ``converged`` whether eigsh met ``tol`` for all k."""

    step: int
    sharpness: List[float]
    threshold: Optional[float]
    num_hvps: int
    seconds: float
    converged: bool

    def as_dict(self) -> dict:
        return asdict(self)


class SharpnessTracker:
    """``update()`` estimates the top ``k`` eigenvalues of the loss Hessian on ``data`` now
    (or, with ``preconditioned=True``, of ``P^-1 H`` for ``optimizer``'s current
    preconditioner), starting Lanczos from the previous estimate's top eigenvector, and
    appends a :class:`SharpnessRecord` to ``history``. Between updates the weights move a
    little, so the old eigenvector is a good start and an estimate takes a few products.

    Args:
        model, loss_fn, data: as :class:`HessianOperator` (``params``, ``mode`` and ``method`` too).
        optimizer: a fusedopt optimizer: its threshold is recorded, and it supplies P for
            ``preconditioned``.
        k: eigenvalues per estimate; tol: eigsh's relative residual tolerance.
        seed: the first estimate's random start vector.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, data, *, optimizer=None, k: int = 1,
                 tol: float = 1e-3, preconditioned: bool = False, params=None, mode: str = "eval", seed: int = 0,
                 method: str = "auto"):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an int >= 1; got {k!r}")
        if not (isinstance(tol, float) and 0 < tol < 1):
            raise ValueError(f"tol must be a float in (0, 1); got {tol!r}")
        if preconditioned and optimizer is None:
            raise ValueError("preconditioned=True needs the optimizer whose preconditioner to use")
        self.op = HessianOperator(model, loss_fn, data, params=params, mode=mode, method=method)
        self.optimizer, self.k, self.tol, self.preconditioned = optimizer, k, tol, preconditioned
        self.generator = torch.Generator().manual_seed(seed)
        self.history: List[SharpnessRecord] = []
        self._start: Optional[torch.Tensor] = None
        self._steps = 0

    def threshold(self) -> Optional[float]:
        if self.optimizer is None:
            return None
        try:
            return stability_threshold(self.optimizer)
        except TypeError:  # LARS, LAMB: no threshold from the hyperparameters alone
            return None

    def update(self, step: Optional[int] = None) -> SharpnessRecord:
        op = precondition(self.op, self.optimizer) if self.preconditioned else self.op
        before = self.op.num_matvecs
        t0 = time.perf_counter()
        result = eigsh(op, k=self.k, which="LA", tol=self.tol, v0=self._start, generator=self.generator)
        seconds = time.perf_counter() - t0
        values = result.eigenvalues.flip(0)
        self._start = result.eigenvectors[:, -1].detach().clone()
        self._steps = self._steps + 1 if step is None else step
        record = SharpnessRecord(step=self._steps, sharpness=[float(v) for v in values],
                                 threshold=self.threshold(), num_hvps=self.op.num_matvecs - before,
                                 seconds=seconds, converged=bool(result.converged.all()))
        self.history.append(record)
        return record

    def plot(self, path: str) -> None:
        """Sharpness against the threshold over the recorded steps, as a PNG (matplotlib)."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("SharpnessTracker.plot needs matplotlib: pip install matplotlib") from None
        fig = Figure(figsize=(6, 3.5))
        ax = fig.add_subplot()
        steps = [r.step for r in self.history]
        ax.plot(steps, [r.sharpness[0] for r in self.history], marker="o", label="top eigenvalue" +
                (" of P^-1 H" if self.preconditioned else ""))
        if any(r.threshold is not None for r in self.history):
            ax.plot(steps, [r.threshold if r.threshold is not None else float("nan") for r in self.history],
                    linestyle="--", label="stability threshold")
        ax.set_xlabel("step")
        ax.set_ylabel("sharpness")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.tight_layout()
        fig.savefig(path)
