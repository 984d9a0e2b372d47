"""argparse types of the console scripts: a number, checked, with what was expected in the message."""

from __future__ import annotations

import argparse
import math

__all__ = ["positive_int", "nonnegative_int", "positive_float", "nonnegative_float", "open_unit_float"]


def number(kind: type, test, expected: str):
    """An argparse type: parses ``kind`` and rejects values failing ``test`` with what was expected."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = expected  # argparse names the type in its messages
    return parse


positive_int = number(int, lambda v: v > 0, "an integer >= 1")
nonnegative_int = number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = number(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
nonnegative_float = number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
open_unit_float = number(float, lambda v: 0 < v < 1, "a number in (0, 1)")
