"""Online estimates the `saber` policy learns from finished requests: output lengths (the engine's
speed and prefill cost are learned by `engine_model.py`).

Pure and cheap: each `observe`/`add` keeps its window sorted as it goes (a bisection and a short
memmove), so a recomputed quantile is one index and they can run on the request path; sorting the
window every few samples instead cost ~2.5 µs a finished request, amortised.

**Running requests are censored samples.** Short requests finish first, so the first lengths a
class sees are its shortest: on the code trace at 3x capacity (outputs p90 ~59) the first eight
finished had 1-7 tokens while thirty longer ones were still running, and the p90 of the finished
alone stayed at 7 for six seconds, so every request was planned at a fifth of its length and
the batch ran late. A running request of the class has produced at least its tokens so far (the
gate's plan of them, scaled by what planned progress has really been worth for the requests that
completed: an unconfirmed model planned 3-5x the tokens the engine made on the calibrated CPU
profile; `Batch.progress`), so when running requests are past the finished lengths' quantile (the
sign that those are short of it), the estimate is the quantile of the finished lengths and the
running ones taken at their progress: a lower bound, which the finished lengths replace as they
come (it is recomputed at every finish while it is above theirs). While no running request is
past it, the plain quantile stands (so the fixed lengths of the paper's tasks give the same value).
The Kaplan-Meier quantile (running requests right-censored) was tried first: with a few dozen
samples it put the censored mass on the few long lengths finished so far (161 tokens for a p90
of ~60 on the calibrated CPU profile), a tail a lower bound cannot overshoot to.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Sequence
from typing import Protocol

RECOMPUTE_EVERY = 8


class Progress(Protocol):
    def progress(self, sla_class: str) -> list[float]: ...


class OutputEstimate:
    """A high quantile of one class's recent output lengths, recomputed every few samples."""

    __slots__ = ("window", "quantile", "min_samples", "value", "_sorted", "_since", "bounded")

    def __init__(self, window: int, quantile: float, min_samples: int) -> None:
        self.window: deque[int] = deque(maxlen=window)
        self.quantile = quantile
        self.min_samples = min_samples
        self.value: int | None = None
        self._sorted: list[int] = []  # the window's values, in order
        self._since = 0
        self.bounded = False  # the value counts running requests (a lower bound, recomputed every finish)

    def add(self, tokens: int, running: Progress | None = None, sla_class: str = "") -> bool:
        """Record one finished request's output length; True when the estimate changed.

        `running`, when given, tells the progress (tokens so far, at least) of the class's running
        requests (`running.progress(sla_class)`); it is asked only when the estimate is recomputed
        (passed as the object, not a closure: no allocation per finished request)."""
        _push(self.window, self._sorted, tokens)
        self._since += 1
        if len(self.window) < self.min_samples or (
                self.value is not None and self._since < RECOMPUTE_EVERY and not self.bounded):
            return False
        ordered = self._sorted
        value = None
        self.bounded = False
        if running is not None:
            cs = running.progress(sla_class)
            if cs:
                value = self._with_running(ordered, cs)
        if value is None:
            value = max(1, int(_at_quantile(ordered, self.quantile)))
        self._since = 0
        changed = value != self.value
        self.value = value
        return changed

    def _with_running(self, ordered: list[int], cs: list[float]) -> int | None:
        """The quantile of the finished lengths and the running requests at their progress (a
        lower bound); None when no running request is past the plain quantile. Sets `bounded`."""
        plain = _at_quantile(ordered, self.quantile)
        if max(cs) <= plain:
            return None
        merged = sorted(ordered + cs)
        value = math.ceil(_at_quantile(merged, self.quantile))
        if value <= plain:
            return None
        self.bounded = True
        return value


def _at_quantile(ordered: Sequence[float], quantile: float) -> float:
    """The value at `quantile` of a sorted, non-empty list (the ceil(q x n)-th, as a p90 reads)."""
    return ordered[max(0, math.ceil(quantile * len(ordered)) - 1)]


def _push(window: deque[int], ordered: list[int], value: int) -> None:
    """Append to a bounded window and keep `ordered` equal to `sorted(window)`."""
    if len(window) == window.maxlen:
        del ordered[bisect_left(ordered, window[0])]
    window.append(value)
    insort(ordered, value)
