"""argparse value types shared by the ``dsalign`` subcommands, and the range rule the Python API applies to the
same values: a bad value is one line naming what was wanted."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from numbers import Integral, Real

_KIND_NAMES = {int: "an integer", float: "a number"}
_KIND_TYPES = {int: Integral, float: Real}  # numpy scalars count; bool does not (see range_error)


def range_error(value: object, kind: type, minimum: float, maximum: float | None = None) -> str | None:
    """Why ``value`` is not a finite ``kind`` in [minimum, maximum] ("expected an integer >= 1"), or None.

    NaN fails every comparison, so a plain ``value < minimum`` test would let it (and inf) through."""
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    number_ok = isinstance(value, _KIND_TYPES[kind]) and not isinstance(value, bool)
    if number_ok and math.isfinite(value) and value >= minimum and (maximum is None or value <= maximum):
        return None
    return f"expected {_KIND_NAMES[kind]} {bounds}"


def bounded(kind: type, minimum: float, maximum: float | None = None) -> Callable[[str], float]:
    """argparse type: a finite int or float in [minimum, maximum] (no upper bound when ``maximum`` is None)."""

    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            number = None
        problem = range_error(number, kind, minimum, maximum)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {value!r}")
        return number

    return parse


positive = bounded(int, 1)
non_negative = bounded(int, 0)
