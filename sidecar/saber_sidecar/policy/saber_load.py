"""The offered load and the largest batch a fresh request fits in, for `SaberPolicy` (saber.py).

- Light load: while the offered load (arrivals' expected tokens per second over the load
  window, against the most the engine delivers within the batch a fresh request
  fits in) is below the light-load mark (saber_tuning.py), the reserve is not asked of requests
  finishing before the candidate, and a candidate that only fits with thin slack (under the
  at-risk share of its time) is admitted unprotected: it holds no later admission back. Near or over capacity the
  gate stays strict, because there it must choose which requests to serve and keep them on time.
"""

from __future__ import annotations

import math

import numpy as np

from saber_sidecar.config import SaberSchedulingConfig, SLAClass
from saber_sidecar.policy.estimates import OutputEstimate
from saber_sidecar.policy.saber_engine import EngineView
from saber_sidecar.policy.saber_tuning import Tuning

LOAD_RECHECK_S = 0.25  # the offered load moves on a 10 s scale: re-checking it every decision is waste
_LS = np.arange(1025, dtype=float)  # L = 0 .. 1024, for `fresh_limit_cached`


class Load:
    """The offered load, and the batch a fresh request of every class still fits in."""

    def __init__(self, engine: EngineView, classes: dict[str, SLAClass], estimates: dict[str, OutputEstimate],
                 p: SaberSchedulingConfig, t: Tuning) -> None:
        self.engine = engine
        self.classes = classes
        self.estimates = estimates  # the policy's, by class: replaced entries are seen here too
        self.margin = p.deadline_margin_seconds
        self.headroom = 1.0 + t.speed_headroom
        self.light_load = t.light_load
        self.tau = t.load_window_seconds
        self.offered = 0.0  # expected tokens per second arriving (exponentially weighted)
        self.offered_t = 0.0
        self.offered_start: float | None = None
        self.light = False
        self.light_at: float | None = None
        self.capacity = 1.0
        self.fresh_need = self.compute_fresh_need()
        # `fresh_limit_cached`: the speed table and fresh need it was computed for
        self.limit_table: list[float] | None = None
        self.limit_need = 0.0
        self.limit = 1

    def compute_fresh_need(self) -> float:
        """The speed a fresh request of the most demanding class needs (for best-effort gating)."""
        worst = 0.0
        table = self.engine.model.table
        for c in self.classes.values():
            est = self.estimates[c.name].value or c.output_tokens
            slack = c.deadline_seconds - self.margin
            if est is None or slack <= 0:
                continue
            need = est / slack
            if c.tpot_seconds:
                need = max(need, 1.0 / c.tpot_seconds)
            if need * self.headroom > table[1]:
                continue  # not even alone on the engine: keeping room for such a request buys nothing
            worst = max(worst, need)
        return worst

    def note_arrival(self, tokens: int, now: float) -> None:
        if self.offered_start is None:
            self.offered_start = now
        dt = now - self.offered_t
        if dt > 0:
            self.offered *= math.exp(-dt / self.tau)
            self.offered_t = now
        self.offered += tokens
        self.light_at = None  # recompute on the next plan

    def is_light(self, now: float) -> bool:
        """Offered load below the light-load mark; recomputed on arrivals and at most every LOAD_RECHECK_S."""
        if self.light_at is None or now - self.light_at > LOAD_RECHECK_S or now < self.light_at:
            self.light = self.offered_ratio(now) < self.light_load
            self.light_at = now
        return self.light

    def offered_ratio(self, now: float) -> float:
        """Offered tokens per second (recent arrivals' expected tokens, exponentially weighted) over
        the most the engine delivers within the fresh limit; bias-corrected for a short history."""
        if self.offered_start is None:
            return 0.0
        tau = self.tau
        span = max(now - self.offered_start, 0.1 * tau)
        weight = tau * (1.0 - math.exp(-span / tau))
        offered = self.offered * math.exp(-max(0.0, now - self.offered_t) / tau) / weight
        self.fresh_limit_cached()
        return offered / self.capacity

    def invalidate(self) -> None:
        """The planning cap changed: the fresh limit is capped by it."""
        self.limit_table = None

    def fresh_limit_cached(self) -> int:
        model = self.engine.model
        table = model.table
        if self.limit_table is not table or self.limit_need != self.fresh_need:
            limit = self.fresh_limit()
            self.limit = len(table) - 1 if limit is None else max(1, limit)
            self.limit_table = table
            self.limit_need = self.fresh_need
            # max(L * v(L) for L in 1..top), in numpy: the same products (L is exact as a float).
            top = min(self.limit, 1024)
            self.capacity = float((_LS[1 : top + 1] * model.table_array[1 : top + 1]).max())
        return self.limit

    def fresh_limit(self) -> int | None:
        """The largest batch at which a fresh request of every class is still predicted to fit,
        and never more than the planning cap (the engine's seats, the slow start)."""
        cap = self.engine.cap
        table = self.engine.model.table
        if self.fresh_need <= 0:
            return None if cap >= len(table) else cap
        target = self.fresh_need * self.headroom
        lo, hi = 0, min(len(table) - 1, cap)
        if table[1] < target:
            return 0
        while lo < hi:  # table is non-increasing: find the last L with table[L] >= target
            mid = (lo + hi + 1) // 2
            if table[mid] >= target:
                lo = mid
            else:
                hi = mid - 1
        return lo
