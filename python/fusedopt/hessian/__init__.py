"""Hessian spectrum of PyTorch models: Lanczos eigenvalues, trace, density, analysis.

- :class:`HessianOperator`: Hessian-vector products of a model's loss (double backward);
  :class:`GGNOperator` (J^T H_out J) and :class:`EmpiricalFisherOperator` (per-sample grads).
- :func:`eigsh`: thick-restart Lanczos, scipy-like (k, which, tol, ncv, v0).
- :func:`trace`: Hutchinson / Hutch++ estimate; :func:`density`: stochastic Lanczos quadrature;
  both take their probes' products in blocks (``block_size``, the operators' ``matmat``).
- :func:`preconditioned`: ``P^-1/2 H P^-1/2`` for a fusedopt optimizer's diagonal preconditioner;
  :func:`stability_threshold`: the edge-of-stability threshold of its hyperparameters.
- :func:`analyze`: minimum / saddle / maximum (flat directions told apart, see :func:`classify`),
  condition number, minimum ratio with its standard error, escape direction; a plottable report.
"""
from .curvature import EmpiricalFisherOperator, GGNOperator
from .analysis import KIND_THRESHOLD, KINDS, PLOT_FLOOR, HessianReport, analyze, classify
from .hvp import HessianOperator
from .lanczos import EigshResult, eigsh
from .operator import MatrixOperator
from .preconditioned import PreconditionedOperator, preconditioned, stability_threshold
from .stochastic import DensityResult, TraceResult, density, trace
from .tracking import SharpnessRecord, SharpnessTracker

__all__ = ["HessianOperator", "MatrixOperator", "eigsh", "EigshResult", "trace", "TraceResult", "density",
           "DensityResult", "analyze", "classify", "HessianReport", "KIND_THRESHOLD", "KINDS", "PLOT_FLOOR",
           "preconditioned", "PreconditionedOperator", "stability_threshold", "GGNOperator",
           "EmpiricalFisherOperator", "SharpnessTracker", "SharpnessRecord"]
