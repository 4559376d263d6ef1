"""argparse value types shared by the ``dsalign`` subcommands: a bad value is one line naming what was wanted
(the rule itself, shared with the Python API, is :func:`dsalign.validation.range_error`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from dsalign.validation import range_error


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
