"""The range rule for numeric options, shared by the command line's flags (``dsalign.cli_args``) and the Python
API's keyword arguments, so both refuse the same values with the same words."""

from __future__ import annotations

import math
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
