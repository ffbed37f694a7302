"""argparse types shared by every command line of fusedopt (``fusedopt bench``,
``fusedopt spectrum``, the benchmark scripts): a bad value is one argparse error
line naming the option, never a traceback."""
from __future__ import annotations

import argparse
import math
from typing import Callable


def integer_at_least(low: int, why: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}{why}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in some messages
    return parse


def _number(accept: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """A float that ``accept`` takes; otherwise the error says ``must be <expected>``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value

    parse.__name__ = expected
    return parse


# A learning rate: finite and > 0.
positive_float = _number(lambda v: math.isfinite(v) and v > 0.0, "a finite number > 0")
# A fraction: in (0, 1].
fraction_of_one = _number(lambda v: 0.0 < v <= 1.0, "in (0, 1]")
