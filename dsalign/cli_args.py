"""argparse value types shared by the ``dsalign`` subcommands: a bad value is one line naming what was wanted."""

from __future__ import annotations

import argparse
from collections.abc import Callable

_KIND_NAMES = {int: "an integer", float: "a number"}


def bounded(kind: type, minimum: float, maximum: float | None = None) -> Callable[[str], float]:
    """argparse type: an int or float in [minimum, maximum] (no upper bound when ``maximum`` is None)."""
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"

    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected {_KIND_NAMES[kind]} {bounds}, got {value!r}") from exc
        if number < minimum or (maximum is not None and number > maximum):
            raise argparse.ArgumentTypeError(f"expected {_KIND_NAMES[kind]} {bounds}, got {value!r}")
        return number

    return parse


positive = bounded(int, 1)
non_negative = bounded(int, 0)
