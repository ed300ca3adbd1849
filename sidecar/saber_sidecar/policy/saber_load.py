"""The offered load and the largest batch a fresh request fits in, for `SaberPolicy` (saber.py).

- Light load: while the offered load (arrivals' expected tokens per second over
  `load_window_seconds`, against the most the engine delivers within the batch a fresh request
  fits in) is below `light_load`, the reserve is not asked of requests finishing before the
  candidate, and a candidate that only fits with thin slack (under `at_risk_slack_share` of its
  time) is admitted unprotected: it holds no later admission back. Near or over capacity the
  gate stays strict, because there it must choose which requests to serve and keep them on time.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from saber_sidecar.policy.saber_state import _SaberState
else:
    _SaberState = object  # at run time the mixin's base is object, as before

LOAD_RECHECK_S = 0.25  # the offered load moves on a 10 s scale: re-checking it every decision is waste
_LS = np.arange(1025, dtype=float)  # L = 0 .. 1024, for `_fresh_limit_cached`


class _LoadMixin(_SaberState):
    """Part of `SaberPolicy`, which holds the state these methods read (see its `__init__`); a
    mixin rather than a helper object, so a decision stays method calls on one object."""

    def _compute_fresh_need(self) -> float:
        """The speed a fresh request of the most demanding class needs (for best-effort gating)."""
        worst = 0.0
        for c in self.classes.values():
            est = self._estimates[c.name].value or c.output_tokens
            slack = c.deadline_seconds - self.margin
            if est is None or slack <= 0:
                continue
            need = est / slack
            if c.tpot_seconds:
                need = max(need, 1.0 / c.tpot_seconds)
            if need * self.headroom > self.model.table[1]:
                continue  # not even alone on the engine: keeping room for such a request buys nothing
            worst = max(worst, need)
        return worst

    def _note_arrival(self, tokens: int, now: float) -> None:
        if self._offered_start is None:
            self._offered_start = now
        dt = now - self._offered_t
        if dt > 0:
            self._offered *= math.exp(-dt / self.load_tau)
            self._offered_t = now
        self._offered += tokens
        self._light_at = None  # recompute on the next plan

    def _is_light(self, now: float) -> bool:
        """Offered load below `light_load`; recomputed on arrivals and at most every LOAD_RECHECK_S."""
        if self._light_at is None or now - self._light_at > LOAD_RECHECK_S or now < self._light_at:
            self._light = self._load(now) < self.light_load
            self._light_at = now
        return self._light

    def _load(self, now: float) -> float:
        """Offered tokens per second (recent arrivals' expected tokens, exponentially weighted) over
        the most the engine delivers within the fresh limit; bias-corrected for a short history."""
        if self._offered_start is None:
            return 0.0
        tau = self.load_tau
        span = max(now - self._offered_start, 0.1 * tau)
        weight = tau * (1.0 - math.exp(-span / tau))
        offered = self._offered * math.exp(-max(0.0, now - self._offered_t) / tau) / weight
        self._fresh_limit_cached()
        return offered / self._capacity

    def _fresh_limit_cached(self) -> int:
        table = self.model.table
        if self._limit_table is not table or self._limit_need != self._fresh_need:
            limit = self._fresh_limit()
            self._limit = len(table) - 1 if limit is None else max(1, limit)
            self._limit_table = table
            self._limit_need = self._fresh_need
            # max(L * v(L) for L in 1..top), in numpy: the same products (L is exact as a float).
            top = min(self._limit, 1024)
            self._capacity = float((_LS[1 : top + 1] * self.model.table_array[1 : top + 1]).max())
        return self._limit

    def _fresh_limit(self) -> int | None:
        """The largest batch at which a fresh request of every class is still predicted to fit,
        and never more than the planning cap (the engine's seats, the slow start)."""
        cap = self._cap
        if self._fresh_need <= 0:
            return None if cap >= len(self.model.table) else cap
        table = self.model.table
        target = self._fresh_need * self.headroom
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
