"""Other libraries' implementations of what fusedopt does, compared when installed
(``pip install "fusedopt[bench]"``) and skipped with a reason otherwise.

A peer that is missing, fails to import, or does not support the device raises
:class:`.compare.Unavailable` from its setup; the row then reads "skipped" with the reason, and
the rest of the table is unaffected. Where a peer computes something different (8-bit state,
another clipping rule) its row carries a note saying so.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .compare import Unavailable


def import_peer(module: str, package: str):
    """The module, or Unavailable naming the pip package. Any import failure counts: a peer whose
    own dependencies are missing is as unavailable as one that is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module.split(".")[0]:
            raise Unavailable(f"{package} not installed (pip install {package})") from None
        raise Unavailable(f"{package} failed to import: {exc}") from None
    except Exception as exc:
        raise Unavailable(f"{package} failed to import: {type(exc).__name__}: {exc}") from None


# ---- elementwise optimizers (Adam, AdamW, SGD) ------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerPeer:
    name: str
    module: str  # imported to see whether the peer is there
    package: str  # what to pip install
    note: str
    make: Callable[[str, List[torch.Tensor], dict], torch.optim.Optimizer]  # (optimizer name, params, hp)

    def missing(self) -> Optional[str]:
        """Why the peer cannot be used at all here, or None."""
        try:
            import_peer(self.module, self.package)
        except Unavailable as exc:
            return str(exc)
        return None


def _bitsandbytes(opt: str, params, hp):
    bnb = import_peer("bitsandbytes", "bitsandbytes")
    cls = {"adam": bnb.optim.Adam, "adamw": bnb.optim.AdamW, "sgd": bnb.optim.SGD}[opt]
    return cls(params, **hp, optim_bits=32)


def _torchao(opt: str, params, hp):
    if opt == "sgd":
        raise Unavailable("torchao has no SGD")
    ao = import_peer("torchao.optim", "torchao")
    return {"adam": ao.Adam8bit, "adamw": ao.AdamW8bit}[opt](params, **hp)


OPTIMIZER_PEERS: Dict[str, OptimizerPeer] = {p.name: p for p in (
    OptimizerPeer("bitsandbytes", "bitsandbytes", "bitsandbytes", "32-bit state (optim_bits=32)", _bitsandbytes),
    OptimizerPeer("torchao-8bit", "torchao.optim", "torchao", "8-bit state: fewer bytes, not the same math", _torchao),
)}


# ---- norm-scaled optimizers -----------------------------------------------------------------------------
def timm_lars(params, lr, momentum, weight_decay, trust_coeff, eps):
    timm_optim = import_peer("timm.optim", "timm")
    return timm_optim.Lars(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           trust_coeff=trust_coeff, eps=eps)


def timm_lamb(params, lr, betas, eps, weight_decay, max_grad_norm):
    timm_optim = import_peer("timm.optim", "timm")
    return timm_optim.Lamb(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                           max_grad_norm=max_grad_norm)


# ---- Hessian eigenvalues ----------------------------------------------------------------------------------
@contextlib.contextmanager
def counting_autograd_grad() -> Iterator[List[int]]:
    """Counts calls of torch.autograd.grad while active: a library that takes one such call per
    Hessian-vector product (PyHessian) has its HVPs counted without changing it."""
    real, count = torch.autograd.grad, [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    torch.autograd.grad = counted
    try:
        yield count
    finally:
        torch.autograd.grad = real


def pyhessian_top(model, loss_fn, X, y, k: int, tol: float) -> Tuple[List[float], int]:
    """Top-k eigenvalues by PyHessian (power iteration with deflation); (values, HVPs)."""
    pyhessian = import_peer("pyhessian", "pyhessian")
    torch.manual_seed(0)  # its start vectors come from torch's global generator
    h = pyhessian.hessian(model, loss_fn, data=(X, y), cuda=False)
    with counting_autograd_grad() as count:
        values, _ = h.eigenvalues(maxIter=1000, tol=tol, top_n=k)
    return sorted(float(v) for v in values), count[0]


def eigenthings_top(model, loss_fn, X, y, k: int, steps: int) -> Tuple[List[float], int]:
    """Top-k eigenvalues by hessian-eigenthings' Lanczos (1.x API) with ``steps`` Lanczos steps: it
    runs a fixed number of steps and has no stopping rule, so the caller picks the budget.
    Returns (values, HVPs)."""
    he = import_peer("hessian_eigenthings", "hessian-eigenthings")
    if not hasattr(he, "lanczos") or not hasattr(he, "supervised_loss"):
        raise Unavailable("hessian-eigenthings: this version lacks the 1.x API (lanczos, supervised_loss)")
    op = he.HessianOperator(model, [(X, y)], he.supervised_loss(loss_fn))
    real_matvec, count = op.matvec, [0]

    def counted(v):
        count[0] += 1
        return real_matvec(v)

    op.matvec = counted
    result = he.lanczos(op, k=k, which="LA", max_iter=min(steps, op.size), reorthogonalize=True, seed=0)
    return sorted(float(v) for v in result.eigenvalues), count[0]
