"""fusedopt: fused multi-tensor optimizers and a Lanczos Hessian-spectrum tool for PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"

from . import _C
from . import lr
from . import functional
from .optim import LAMB, LARS, SGD, Adam, AdamW, Muon, muon_param_groups
from .optim.state import dequantized_state_dict
from ._kernels import fast_checks as _fast_checks


def cuda_available() -> bool:
    """True when this build has CUDA kernels and a GPU can run them now."""
    return _C.cuda_compiled() and _C.cuda_available()


def build_info() -> dict:
    """Version, CUDA build facts, the CPU SIMD level in use, and whether the per-step
    checks take the C++ path through torch's C shim (``fast_checks``: "on (...)" or
    "off (why)"; README "Host overhead")."""
    archs = _C.cuda_archs()
    return {
        "version": __version__,
        "cuda_compiled": bool(_C.cuda_compiled()),
        "cuda_archs": [a for a in archs.split(",") if a],
        "cuda_available": cuda_available(),
        "cpu_simd": _C.simd_level(),
        "cpu_threads": _C.num_threads(),
        "fast_checks": _fast_checks.status(),
    }


def set_num_threads(n: int) -> None:
    """Threads the CPU kernels use (n <= 0: all cores). Results do not depend on it."""
    _C.set_num_threads(int(n))


def get_num_threads() -> int:
    return int(_C.num_threads())


__all__ = ["SGD", "Adam", "AdamW", "LARS", "LAMB", "Muon", "muon_param_groups", "dequantized_state_dict", "functional", "lr", "build_info", "cuda_available", "set_num_threads", "get_num_threads"]
