"""Online estimates the `saber` policy learns from finished requests: output lengths (the engine's
speed and prefill cost are learned by `engine_model.py`).

Pure and cheap: each `observe`/`add` keeps its window sorted as it goes (a bisection and a short
memmove), so a recomputed quantile is one index and they can run on the request path; sorting the
window every few samples instead cost ~2.5 µs a finished request, amortised.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque

RECOMPUTE_EVERY = 8


class OutputEstimate:
    """A high quantile of one class's recent output lengths, recomputed every few samples."""

    __slots__ = ("window", "quantile", "min_samples", "value", "_sorted", "_since")

    def __init__(self, window: int, quantile: float, min_samples: int) -> None:
        self.window: deque[int] = deque(maxlen=window)
        self.quantile = quantile
        self.min_samples = min_samples
        self.value: int | None = None
        self._sorted: list[int] = []  # the window's values, in order
        self._since = 0

    def add(self, tokens: int) -> bool:
        """Record one finished request's output length; True when the estimate changed."""
        _push(self.window, self._sorted, tokens)
        self._since += 1
        if len(self.window) < self.min_samples or (self.value is not None and self._since < RECOMPUTE_EVERY):
            return False
        ordered = self._sorted
        value = max(1, ordered[max(0, math.ceil(self.quantile * len(ordered)) - 1)])
        self._since = 0
        changed = value != self.value
        self.value = value
        return changed


def _push(window: deque[int], ordered: list[int], value: int) -> None:
    """Append to a bounded window and keep `ordered` equal to `sorted(window)`."""
    if len(window) == window.maxlen:
        del ordered[bisect_left(ordered, window[0])]
    window.append(value)
    insort(ordered, value)
