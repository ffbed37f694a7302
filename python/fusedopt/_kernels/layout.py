"""The row layout of ``fusedopt._C``, by name.

The compiled core exports its layout (``_C.LAYOUT``, csrc/bindings/bind_layout.cpp):
the pointer column of every tensor a kernel reads or writes, the meaning of
each option bit, the dtype codes and the order of each kernel's float
hyperparameters. This module is the only Python code that turns those names
into numbers; everything above it says ``"exp_avg"`` or ``"nesterov"``.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch

from .. import _C

_LAYOUT = _C.LAYOUT

ROW_WIDTH: int = _LAYOUT["row_width"]
POINTER_COLUMNS: int = _LAYOUT["pointer_columns"]
NUMEL_COLUMN: int = _LAYOUT["numel_column"]
FLAGS_COLUMN: int = _LAYOUT["flags_column"]
ROW_FLAGS: Dict[str, int] = dict(_LAYOUT["row_flags"])
ROW_SALT_SHIFT: int = _LAYOUT["row_salt_shift"]  # flags bits from here up: the row's stochastic-rounding salt

DTYPE_CODES: Dict[torch.dtype, int] = {getattr(torch, name): code for name, code in _LAYOUT["dtype_codes"].items()}
DTYPE_OF_CODE: Dict[int, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}


class KernelLayout:
    """One kernel's columns, option flags and hyperparameter order."""

    __slots__ = ("name", "columns", "flag_bits", "hyper")

    def __init__(self, name: str, spec: Mapping):
        self.name = name
        self.columns: Dict[str, int] = dict(spec["columns"])
        self.flag_bits: Dict[str, int] = dict(spec["flags"])
        self.hyper: Tuple[str, ...] = tuple(spec["hyper"])

    def column(self, name: str) -> int:
        try:
            return self.columns[name]
        except KeyError:
            raise KeyError(f"kernel {self.name!r} has no column {name!r}; it has {sorted(self.columns)}") from None

    def flags(self, **options: bool) -> int:
        """The kernel's flags int from named options, e.g. ``flags(nesterov=True)``."""
        bits = 0
        for name, on in options.items():
            if name not in self.flag_bits:
                raise KeyError(f"kernel {self.name!r} has no flag {name!r}; it has {sorted(self.flag_bits)}")
            if on:
                bits |= self.flag_bits[name]
        return bits

    def hyper_values(self, values: Mapping[str, float]) -> Tuple[float, ...]:
        """The float hyperparameters in the order the ``_C`` entry takes them."""
        return tuple(float(values[name]) for name in self.hyper)


KERNELS: Dict[str, KernelLayout] = {name: KernelLayout(name, spec) for name, spec in _LAYOUT["kernels"].items()}


def kernel_layout(name: str) -> KernelLayout:
    return KERNELS[name]
