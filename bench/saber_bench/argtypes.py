"""argparse types for the benchmark's comma-separated options: a bad value is a usage error
that says what was expected, not a traceback."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def _numbers(text: str, kind: Callable[[str], Any], noun: str, ok: Callable[[Any], bool], bound: str) -> list[Any]:
    try:
        vals = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"values must be comma-separated {noun}, got {text!r}") from None
    if not vals or not all(ok(v) for v in vals):
        raise argparse.ArgumentTypeError(f"values must be {noun} {bound}, got {text!r}")
    return vals


def positive_floats(text: str) -> list[float]:
    """'0.5,1,2' -> [0.5, 1.0, 2.0]; every value > 0."""
    return _numbers(text, float, "numbers", lambda v: v > 0, "> 0")


def positive_ints(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; every value >= 1."""
    return _numbers(text, int, "integers", lambda v: v >= 1, ">= 1")


def names(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [x.strip() for x in text.split(",") if x.strip()]
