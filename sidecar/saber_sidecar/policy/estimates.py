"""Online estimates the `saber` policy learns from finished requests: prefill cost and output lengths.

Pure and cheap: each `observe`/`add` keeps its window sorted as it goes (a bisection and a short
memmove), so a recomputed quantile is one index and they can run on the request path; sorting the
window every few samples instead cost ~2.5 µs a finished request, amortised.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque

# Clusters of prompt tokens smaller than this say too little about the per-token cost: the wait
# for the engine step in progress (up to one step) is then as large as the prefill itself.
PREFILL_MIN_TOKENS = 256
PREFILL_QUANTILE = 0.2
PREFILL_MIN_SAMPLES = 16
PREFILL_WINDOW = 256
RECOMPUTE_EVERY = 8


class PrefillCost:
    """Engine seconds per prompt token, learned from time to first token (TTFT).

    Every admission makes the engine prefill the new prompt, and while it does every running
    request waits (vLLM's chunked prefill shares each step). A request's TTFT, measured from its
    admission, is the rest of the step in progress, then one step that carries its prefill and the
    prefills of the prompts admitted just before it (`cluster_tokens`), and sometimes more: a
    cluster larger than the step's token budget, or a long step of someone else's prefill in
    progress. So `(TTFT - step time) / cluster_tokens` over-estimates the cost per token by a
    positive, heavy-tailed amount; a low quantile of it is close to the cost itself (on the emulator
    within 15% at half the default cost, within 5% at the default and twice it; a least-squares slope of
    TTFT against prompt tokens was 60-170% too high under sustained load, because admissions come
    in clusters). Until `PREFILL_MIN_SAMPLES` clusters of at least `PREFILL_MIN_TOKENS` tokens have
    been seen, the configured prior is used.
    """

    __slots__ = ("per_token", "prior", "_window", "_sorted", "_since")

    def __init__(self, initial: float) -> None:
        self.per_token = self.prior = initial
        self._window: deque[float] = deque(maxlen=PREFILL_WINDOW)
        self._sorted: list[float] = []  # the window's values, in order
        self._since = 0

    @property
    def samples(self) -> int:
        return len(self._window)

    def observe(self, cluster_tokens: int, ttft: float, step_seconds: float) -> bool:
        """Record one TTFT; True when the estimate was recomputed."""
        if cluster_tokens < PREFILL_MIN_TOKENS or not (ttft >= 0.0 and math.isfinite(ttft)):
            return False
        value = max(0.0, ttft - max(step_seconds, 0.0)) / cluster_tokens
        _push(self._window, self._sorted, value)
        self._since += 1
        if len(self._window) < PREFILL_MIN_SAMPLES or self._since < RECOMPUTE_EVERY:
            return False
        self._since = 0
        ordered = self._sorted
        self.per_token = min(ordered[int(PREFILL_QUANTILE * (len(ordered) - 1))], 0.01)
        return True

    def seconds(self, prompt_tokens: float) -> float:
        return self.per_token * prompt_tokens


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


def _push(window: deque, ordered: list, value: float) -> None:
    """Append to a bounded window and keep `ordered` equal to `sorted(window)`."""
    if len(window) == window.maxlen:
        del ordered[bisect_left(ordered, window[0])]
    window.append(value)
    insort(ordered, value)
