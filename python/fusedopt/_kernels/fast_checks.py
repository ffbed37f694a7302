"""The per-step checks of a kept row table in one C++ pass (``_C.RowScanner``).

A step whose plan is reused must still see every change since the last step:
a param whose storage, dtype, shape or layout changed, a grad that was replaced
by one of another dtype, shape or device, made non-contiguous or pointed into
memory the step writes. Reading that through each tensor's Python attributes
costs several hundred ns a tensor. ``_C`` reads the same facts through torch's
ABI-stable C shim (csrc/bindings/torch_shim.h), found at run time in the
library ``import torch`` loaded: about ten times cheaper.

When the shim cannot be found, fails its self-check below, or
``FUSEDOPT_FAST_CHECKS=0`` is set, the Python checks of ``rows.py`` run alone
(the same checks, slower). When a fast check says anything differs, the Python
checks run too: they re-plan, or raise naming the tensor.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

import torch

from .. import _C
from .layout import DTYPE_CODES

_status = "not loaded"


def _library_path() -> Optional[str]:
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if os.path.exists(os.path.join(lib, name)):
            return os.path.join(lib, name)
    found = sorted(glob.glob(os.path.join(lib, "libtorch_cpu*")))
    return found[0] if found else None


def _python_facts(t: torch.Tensor):
    return (t.data_ptr(), DTYPE_CODES.get(t.dtype, -1), 0 if t.device.type == "cpu" else 1,
            -1 if t.device.type == "cpu" else t.device.index, t.is_contiguous(), tuple(t.shape), tuple(t.stride()))


def _self_check() -> Optional[str]:
    """Every fact the shim reads must equal torch's own attribute on tensors of
    each kind a step meets; None when they all do, else what differed."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    samples = [base, base.t(), base[1:, 2:], base.to(torch.bfloat16)[2], torch.zeros((), dtype=torch.float64),
               torch.ones(1, 3, 1, dtype=torch.float16), torch.empty(0, 5), torch.ones(3, dtype=torch.int64),
               torch.ones(2, 3, 4, 5).to(memory_format=torch.channels_last),
               torch.nn.Parameter(torch.randn(2, 3))]
    for t in samples:
        got, want = _C.tensor_facts(t), _python_facts(t)
        if got != want:
            return f"the shim read {got} for a tensor whose attributes are {want}"
    if _C.tensor_facts(torch.ones(2).to_sparse()) is not None or _C.tensor_facts(object()) is not None:
        return "the shim read facts of a sparse tensor or of a non-tensor"
    return None


def _load() -> None:
    global _status
    if os.environ.get("FUSEDOPT_FAST_CHECKS", "1") == "0":
        _status = "off (FUSEDOPT_FAST_CHECKS=0)"
        return
    path = _library_path()
    if path is None or not _C.torch_shim_load(path):
        _status = f"off (torch's C shim was not found in {path})"
        return
    problem = _self_check()
    if problem is not None:
        _C.torch_shim_enable(False)
        _status = f"off ({problem})"
        return
    _status = "on (torch C shim)"


def status() -> str:
    """'on (torch C shim)', or 'off (why)'."""
    return _status


def set_enabled(on: bool) -> None:
    """Switches the fast checks off or back on (tests run both paths)."""
    _C.torch_shim_enable(bool(on) and _status.startswith("on"))


def enabled() -> bool:
    return bool(_C.torch_shim_active())


_load()
