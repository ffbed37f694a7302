"""Thick-restart Lanczos (Wu & Simon, 2000) with full reorthogonalization.

:func:`eigsh` finds a few extreme eigenpairs of a symmetric operator with few
matrix-vector products (matvecs); for a Hessian a matvec is a Hessian-vector
product (HVP), which dominates the cost.

How it works. The basis ``V`` holds at most ``ncv`` orthonormal vectors (one
row each; memory ~``ncv`` vectors plus a transient of the kept ones at a
restart). Each step applies the operator to the newest vector, then
orthogonalizes the result against *every* kept vector (a second time when
the DGKS test says the first pass lost accuracy: "twice is
enough", Giraud et al.), with the fused kernels of ``fusedopt._kernels``
(dots in one pass over ``V``, then ``w -= V^T h`` fused with ``||w||``, fp64
accumulation). The coefficients form the projected matrix ``T = V^T A V``.
Full reorthogonalization is what prevents the "ghost" copies of converged
eigenvalues that plain Lanczos produces.

When the basis is full, the method restarts *thickly*: it keeps the Ritz
vectors of the wanted end(s) of the spectrum plus some neighbours (about
``k + (ncv - k) / 2``), for which ``T`` becomes diagonal plus one coupling row
to the residual vector, and goes on from the residual. No information about
the wanted eigenvectors is thrown away, which keeps the matvec count low.

Host synchronization: the vector work runs on the operator's device with no
host sync per basis vector; once per iteration (= per matvec) the driver
copies the ~``ncv`` new coefficients to the host to solve the small
tridiagonal/arrowhead eigenproblem, test convergence and pick the restart.

Convergence: a Ritz pair ``(theta, x)`` has residual ``||A x - theta x|| =
beta * |u_last|`` (exact in exact arithmetic; with full reorthogonalization
it is accurate to rounding). It counts as converged when that residual is at
most ``tol * max(|theta|, eps * ||T||)``, i.e. relative to the eigenvalue, with
a floor at the operator's rounding level so that (near-)zero eigenvalues can
converge. Values that are not converged when ``max_matvecs`` runs out are
still returned, flagged in ``converged`` and announced by a warning.

Multiplicity: a Krylov space from one start vector sees one direction of each
eigenspace; copies of an exactly repeated eigenvalue appear only as rounding
noise builds up after the first copy converged, so (as with scipy/ARPACK) a
copy can be missed. ``multiplicity_check=True`` costs extra matvecs and
closes that gap: once the wanted pairs converge it locks them, continues
from a fresh random vector orthogonal to them, and stops only when the next
candidate (rank k + 1) has converged too, so a missed copy shows up as a
wanted value. The same fresh start is used when the Krylov space becomes
invariant.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .. import _kernels
from .operator import apply, as_operator, basis_dtype

WHICH = ("LA", "SA", "LM", "BE")


@dataclass
class EigshResult:
    """Result of :func:`eigsh`.

    eigenvalues:  (k,) float64 CPU tensor, ascending (as scipy returns them).
    eigenvectors: (n, k) tensor on the operator's device; column i goes with eigenvalues[i].
    residuals:    (k,) float64, ``||A x_i - lambda_i x_i||`` (an upper bound of it after the
                  restart of ``multiplicity_check``, which drops the locked vectors' couplings).
    converged:    (k,) bool, residual <= tol * max(|lambda|, eps * ||T||).
    num_matvecs:  operator applications used.
    num_restarts: thick restarts done.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    num_matvecs: int
    num_restarts: int

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


_DGKS = 1.0 / math.sqrt(2.0)  # second Gram-Schmidt pass threshold


def _ranking(theta: np.ndarray, which: str, k: int, both_ends: bool = False) -> np.ndarray:
    """Indices of the Ritz values, most wanted first."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    if which == "BE":
        return _alternate_ends(theta, high_first=True)
    by_magnitude = np.argsort(-np.abs(theta), kind="stable")
    if not both_ends:
        return by_magnitude
    # LM guarding both ends: the k largest |theta|, then the others alternating between their
    # two ends, the larger |theta| first: ranks k and k + 1 are each end's next candidate.
    head = by_magnitude[:k]
    rest = np.setdiff1d(np.arange(len(theta)), head)
    if len(rest) == 0:
        return head
    return np.concatenate([head, rest[_alternate_ends(theta[rest], high_first=theta[rest].max() >= -theta[rest].min())]])


def _alternate_ends(theta: np.ndarray, high_first: bool) -> np.ndarray:
    """Indices alternating between the high and the low end (BE: high first, so an odd k takes
    one more from the top, like scipy)."""
    asc = np.argsort(theta, kind="stable")
    out, lo, hi = [], 0, len(asc) - 1
    take_high = high_first
    while lo <= hi:
        if take_high:
            out.append(asc[hi]); hi -= 1
        else:
            out.append(asc[lo]); lo += 1
        take_high = not take_high
    return np.asarray(out, dtype=np.int64)


def _validate(op, k, which, tol, ncv, max_matvecs, v0):
    op = as_operator(op)
    n = op.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}] (the operator size); got {k!r}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}; got {which!r}")
    if not isinstance(tol, (int, float)) or not tol > 0 or not math.isfinite(tol):
        raise ValueError(f"tol must be a positive finite number; got {tol!r}")
    if ncv is None:
        ncv = min(n, max(2 * k + 1, 20))
    elif isinstance(ncv, bool) or not isinstance(ncv, int) or not (k < ncv <= n or ncv == n >= k):
        raise ValueError(f"ncv must be an int with k < ncv <= n (k={k}, n={n}); got {ncv!r}")
    if max_matvecs is None:
        max_matvecs = max(100 * ncv, 10 * n) if n <= 10_000 else 100 * ncv
    elif isinstance(max_matvecs, bool) or not isinstance(max_matvecs, int) or max_matvecs < k:
        # Fewer than k matvecs cannot produce k Ritz pairs: the result would silently be
        # shorter than the documented (k,) shape.
        raise ValueError(f"max_matvecs must be an int >= k (k={k}); got {max_matvecs!r}")
    if v0 is not None:
        if not isinstance(v0, torch.Tensor) or v0.numel() != n:
            raise ValueError(f"v0 must be a tensor of {n} elements; got "
                             f"{list(v0.shape) if isinstance(v0, torch.Tensor) else type(v0).__name__}")
        # Checked here, not left to torch: a complex v0 would silently lose its imaginary
        # part, and sparse/meta/bool ones failed inside with unrelated errors.
        if v0.layout is not torch.strided:
            raise TypeError(f"v0 must be a dense tensor; got layout {v0.layout}")
        if v0.is_complex() or v0.dtype is torch.bool:
            raise TypeError(f"v0 must be a real tensor (float or integer); got {v0.dtype}")
        if v0.device.type not in ("cpu", "cuda"):
            raise ValueError(f"v0 must be on a cpu or cuda device; got {v0.device}")
        if not torch.isfinite(v0).all() or not bool(v0.abs().sum() > 0):
            raise ValueError("v0 must be finite and nonzero")
    return op, n, ncv, max_matvecs


def eigsh(op, k: int = 1, which: str = "LA", tol: float = 1e-3, ncv: Optional[int] = None,
          max_matvecs: Optional[int] = None, v0: Optional[torch.Tensor] = None,
          generator: Optional[torch.Generator] = None, multiplicity_check: bool = False) -> EigshResult:
    """``k`` eigenpairs of the symmetric operator ``op`` by thick-restart Lanczos.

    Args:
        op: a square tensor or an object with ``.shape``, ``.dtype``, ``.device``, ``.matvec``.
        k: number of eigenpairs.
        which: "LA" largest algebraic, "SA" smallest algebraic, "LM" largest magnitude,
            "BE" both ends (half from each; one more from the top when k is odd).
            LM's wanted set is some values from each end, and the two ends compete for its
            last place. A thick restart discards the least wanted Ritz vectors, which damps
            their eigen-directions: with a small basis, the next candidate of the losing end
            is thrown away again and again, and the other end's value converges in its
            place (in a fuzz of random spectra of n <= 40, 13% of the converged LM results
            with ncv = k + 1 held a wrong value, 2% with ncv = k + 3, none with the default
            ncv; scipy/ARPACK fails the same way). So when ``k + 3 <= ncv`` is below the
            default ncv, LM keeps the next candidate of *each* end at every restart and
            stops only when both have converged too: no wrong set in that fuzz, for about
            3x the HVPs at ``ncv = k + 3``. (At the default ncv it found no wrong set either
            and cost 30% more HVPs on n = 300, so the default runs without it.) With
            ``ncv < k + 3`` there is no room for both candidates and a UserWarning says so.
        tol: relative residual: a Ritz pair ``(l, x)`` (``||x|| = 1``) is converged when
            ``||A x - l x|| <= tol * max(|l|, eps ||T||)``, ``eps`` the basis dtype's machine epsilon
            and ``||T||`` the largest ``|Ritz value|`` (the floor lets values near 0 converge).
            For a symmetric operator that residual bounds the distance from ``l`` to the nearest
            eigenvalue of ``A`` (Weyl): a converged ``l`` is within ``tol * max(|l|, eps ||T||)`` of one;
            the eigenvalue error is usually far smaller (quadratic in the residual when the
            eigenvalue is isolated), but no cheaper bound is claimed: an estimate ``r^2 / gap`` with
            the gap taken from the other Ritz values was tried and failed against dense spectra
            (the Krylov space had not yet seen the eigenvalues inside the gap). Which eigenvalue
            ``l`` approximates is a Krylov matter: at loose ``tol`` an extreme value that the start
            vector barely touches can be missed, as with scipy/ARPACK.
        ncv: basis size (memory ~ncv vectors); default ``min(n, max(2k + 1, 20))``.
        max_matvecs: cap on operator applications (at least k); default ``max(100 ncv, 10 n)`` (``100 ncv`` for n > 10^4).
        v0: start vector (warm start, e.g. last step's top eigenvector); random normal by default.
        generator: torch.Generator for the random start / refresh vectors (CPU generator).
        multiplicity_check: verify that no copy of a repeated eigenvalue was missed (see module doc).

    Returns:
        :class:`EigshResult`. Unconverged pairs are flagged and a RuntimeWarning is issued.

    Raises:
        FloatingPointError: the operator returned a non-finite vector.
    """
    op, n, ncv, max_matvecs = _validate(op, k, which, tol, ncv, max_matvecs, v0)
    dtype = basis_dtype(op.dtype)
    dev = op.device
    eps = float(torch.finfo(dtype).eps)
    V = torch.empty(ncv, n, dtype=dtype, device=dev)
    T = np.zeros((ncv, ncv))
    # Coupling of each basis vector to the residual direction dropped when the multiplicity
    # check locks the converged vectors (zero until then). Without it the reported residuals
    # after the lock ignored that coupling and understated ||A x - lambda x|| (found by
    # tests/test_fuzz_functional.py): a Ritz vector V^T y has up to |dropped . y| more.
    dropped = np.zeros(ncv)

    def random_vector() -> torch.Tensor:
        return torch.randn(n, dtype=dtype, generator=generator).to(dev)

    def orthonormal_into(row: int, x: torch.Tensor) -> bool:
        """V[row] = x orthogonalized against V[:row], normalized; False if x lies in their span."""
        x = x.to(device=dev, dtype=dtype).contiguous().clone()
        nrm0 = float(x.norm())
        for _ in range(2):
            h = _kernels.lanczos_dots(V, row, x)
            nrm = _kernels.lanczos_orthogonalize(V, row, x, h)
        nrm = float(nrm)
        if not nrm > 1e3 * eps * nrm0:
            return False
        V[row].copy_(x / nrm)
        return True

    orthonormal_into(0, v0.reshape(-1) if v0 is not None else random_vector())
    m, matvecs, restarts = 1, 0, 0
    theta = U = res = None
    wanted = np.zeros(0, dtype=np.int64)
    checking = False  # True after the multiplicity check's fresh start
    # LM with a basis below the default: keep and converge each end's next candidate (see
    # ``which`` in the docstring); the default basis did not need it and it costs HVPs there.
    both_ends = which == "LM" and k + 3 <= ncv < min(n, max(2 * k + 1, 20))
    min_keep = k + 2 if both_ends else 0
    if which == "LM" and ncv < min(n, k + 3):
        warnings.warn(f"eigsh: which='LM' with ncv={ncv} < k + 3 = {k + 3} can converge to a value of the wrong "
                      "end (no room to keep both ends' next candidates); use ncv >= k + 3 (the default is "
                      "max(2k + 1, 20))", UserWarning, stacklevel=2)
    while True:
        w = apply(op, V[m - 1])
        matvecs += 1
        # Classical Gram-Schmidt against the whole kept basis, repeated only when
        # the first pass cancelled most of w (the DGKS test, as in ARPACK):
        # ||w1|| < ||w0|| / sqrt(2) means w1 may have lost orthogonality.
        w0_norm = w.norm(dtype=torch.float64) if w.dtype != torch.float64 else w.norm()
        h1 = _kernels.lanczos_dots(V, m, w)
        beta_t = _kernels.lanczos_orthogonalize(V, m, w, h1)
        h = h1
        if float(beta_t) < _DGKS * float(w0_norm):  # host read: one scalar pair per iteration
            h2 = _kernels.lanczos_dots(V, m, w)
            beta_t = _kernels.lanczos_orthogonalize(V, m, w, h2)
            h = h1 + h2
        coeffs = torch.cat([h, beta_t]).cpu().numpy()
        if not np.isfinite(coeffs).all():
            raise FloatingPointError(
                f"op.matvec returned a non-finite vector (matvec {matvecs}); the operator (e.g. the loss "
                "or its Hessian at these parameters) is not finite")
        h, beta = coeffs[:m], float(coeffs[m])
        T[m - 1, :m] = h
        T[:m, m - 1] = h
        theta, U = np.linalg.eigh(T[:m, :m])
        anorm = float(np.abs(theta).max())
        res = beta * np.abs(U[m - 1, :])
        invariant = beta <= 10 * eps * max(anorm, 1e-300) * math.sqrt(n)
        if invariant:
            res[:] = 0.0 if beta == 0 else np.minimum(res, beta)
        res = res + np.abs(dropped[:m] @ U)  # triangle inequality: an upper bound after a lock
        order = _ranking(theta, which, k, both_ends)
        wanted = order[:k]
        conv = res <= tol * np.maximum(np.abs(theta), eps * anorm)
        need = order[:k + 1] if checking else wanted
        if both_ends and m >= k + 2:
            need = order[:max(len(need), k + 2)]  # LM: each end's next candidate too
        done = len(wanted) == k and conv[need].all()
        if m == n or matvecs >= max_matvecs:  # whole space spanned (T exact) or out of budget
            break
        if done and multiplicity_check and not checking and m < n:
            # Lock the converged wanted vectors (their couplings are below tol) and go on from
            # a fresh random vector orthogonal to them.
            checking = True
            m = _restart(V, T, theta, U, order, k, k + 1, m, 0.0, None, dtype, dropped, lock_beta=beta) - 1
            dropped[m] = 0.0
            restarts += 1
            invariant = True
        elif done:
            break
        if invariant:
            # Krylov space invariant: continue from a random vector orthogonal to the basis.
            if m == ncv:
                m = _restart(V, T, theta, U, order, k, ncv, m, 0.0, None, dtype, dropped, min_keep=min_keep)
                restarts += 1
                m -= 1  # _restart reserved V[m-1] for the residual; there is none
            T[m, :] = 0.0
            dropped[m] = 0.0
            T[:, m] = 0.0
            for _ in range(3):
                if orthonormal_into(m, random_vector()):
                    break
            else:
                break
            m += 1
            continue
        if m == ncv:
            m = _restart(V, T, theta, U, order, k, ncv, m, beta, w, dtype, dropped, min_keep=min_keep)
            restarts += 1
        else:
            V[m].copy_(w / beta_t.to(dtype))
            T[m, m - 1] = T[m - 1, m] = beta
            m += 1

    # Ritz vectors of the wanted values, eigenvalues ascending.
    pick = wanted[np.argsort(theta[wanted], kind="stable")]
    Y = torch.from_numpy(np.ascontiguousarray(U[:, pick])).to(device=dev, dtype=dtype)
    vectors = V[:m].T @ Y
    vectors = vectors / vectors.norm(dim=0, keepdim=True)
    conv = res <= tol * np.maximum(np.abs(theta), eps * float(np.abs(theta).max()))
    result = EigshResult(
        eigenvalues=torch.from_numpy(theta[pick].copy()),
        eigenvectors=vectors,
        residuals=torch.from_numpy(res[pick].copy()),
        converged=torch.from_numpy(conv[pick].copy()),
        num_matvecs=matvecs,
        num_restarts=restarts,
    )
    if len(pick) < k or not result.all_converged:
        warnings.warn(
            f"eigsh: {int((~result.converged).sum()) + k - len(pick)} of {k} eigenpairs did not converge to "
            f"tol={tol} within max_matvecs={max_matvecs}; see result.converged and result.residuals",
            RuntimeWarning, stacklevel=2)
    return result


def _restart(V, T, theta, U, order, k, ncv, m, beta, w, dtype, dropped, lock_beta=0.0, min_keep=0) -> int:
    """Thick restart: keep the most wanted Ritz vectors, then the residual. Returns the new m.

    ``dropped`` (updated in place) follows the basis rotation; ``lock_beta`` is the coupling
    to the residual that a lock (``w is None``) discards, added to it; at least ``min_keep``
    vectors are kept (LM's two ends' candidates)."""
    p = max(k, min(ncv - 1, k + (ncv - k) // 2))
    p = max(p, min(min_keep, ncv - 1))
    p = min(p, m - 1) if m > 1 else 1
    keep = np.sort(order[:p])
    Y = torch.from_numpy(np.ascontiguousarray(U[:, keep])).to(device=V.device, dtype=dtype)
    V[:p].copy_(Y.T @ V[:m])  # transient p x n
    rotated = dropped[:m] @ U[:, keep] + lock_beta * U[m - 1, keep]
    dropped[:] = 0.0
    dropped[:p] = rotated
    T[:, :] = 0.0
    T[np.arange(p), np.arange(p)] = theta[keep]
    T[p, :p] = T[:p, p] = beta * U[m - 1, keep]
    if w is not None:
        V[p].copy_(w / beta)
    return p + 1
