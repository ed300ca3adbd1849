"""The feasibility check, for `SaberPolicy` (saber.py): the batch replay (`plan`) and the
admission test (`fits`), which returns its verdict with its flag (`Fit`).

- The batch: every running request's progress is tracked. All running requests advance at the
  model's v(L) while L run, so one running integral W(t) = ∫ v(L) dt gives each one's tokens so
  far (W(now) - W(admitted)) and so its remaining tokens. A decision plays the batch forward
  (`plan`): requests finish in order of remaining tokens and the survivors speed up as L falls
  (v(n) less the speed headroom while n run). A candidate is admitted only if, with it added now,
  it finishes by its deadline (less `deadline_margin_seconds`) and no running SLA request that
  would otherwise be on time is pushed late. Admissions are the only way the batch grows, so this
  keeps every admitted request on time as far as the model can tell, without assuming the batch
  stays at L+1 for ever (which throttles the engine well below what it can carry). TPOT targets
  cap the batch at the L where v(L) still gives 1/tpot tokens per second.
- Prefill backlog: the engine prefills admitted prompts in turn (a chunk of its token budget a
  step), so a candidate's first token waits for the prompts admitted before it that are not
  prefilled yet (`Batch.prefill_ahead`): its own finish, and its TTFT target (`Admission.ttft_fits`), count
  that wait. The running requests already carry those stalls (charged at each admission).
  Without it a burst of long prompts (a code trace: 1.5k-5k tokens) was admitted as if each
  prefill began at once, and most of the burst missed.
- Slack reserve: an admission must leave every running SLA request (and itself)
  `Tuning.slack_reserve_share` x the candidate's own time to deadline as slack, so long requests stop
  taking the batch's last slack while short, urgent ones can still get in.
- Within the model's error: a running request predicted to finish with less slack than
  `Tuning.at_risk_slack_share` of its remaining time may be overtaken by a shorter candidate (one that
  finishes first). Holding every arrival back for a request whose fate is a coin toss stalls the
  batch for its whole remaining life, and the requests held back are then admitted with thin
  slack themselves and hold back the next ones: under sustained load the gate ran the engine at
  a third of the batch it could carry.
- Bounds: in a large batch with loose deadlines (the sidecar under a steady load with a long SLA),
  bounds on the replay settle most candidates without it (`fits_by_bounds`; the verdict is the
  one the replay would reach), so such a decision costs O(1) in the batch size, not O(n).

Under light load (`saber_load.py`) the reserve is not asked of requests finishing before the
candidate, and a candidate that fits only with thin slack is admitted unprotected (`Fit.thin`).
"""

from __future__ import annotations

import enum
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from saber_sidecar.config import SaberSchedulingConfig
from saber_sidecar.policy.saber_batch import INF, Batch
from saber_sidecar.policy.saber_engine import EngineView
from saber_sidecar.policy.saber_load import LOAD_RECHECK_S, Load
from saber_sidecar.policy.saber_tuning import Tuning


class Verdict(enum.Enum):
    FITS = "fits"
    MISSES_OWN = "misses its own deadline"
    HURTS_BATCH = "pushes a running request late"


class Fit(NamedTuple):
    """`fits`'s answer: the verdict, and for FITS whether the candidate goes in unprotected (its
    slack is thin under light load, or it is cold): protecting it would hold later admissions back."""

    verdict: Verdict
    thin: bool


FITS, MISSES_OWN, HURTS_BATCH = Verdict.FITS, Verdict.MISSES_OWN, Verdict.HURTS_BATCH
# The four answers, built once: `fits` runs for every candidate and allocates none.
FIT, FIT_THIN, MISSES, HURTS = Fit(FITS, False), Fit(FITS, True), Fit(MISSES_OWN, False), Fit(HURTS_BATCH, False)
# `fits_by_bounds` costs about as much as replaying ~10-15 requests: it is tried while the share of
# candidates it settles times the batch size is at least BOUNDS_WORTH, and else every BOUNDS_PROBE-th.
BOUNDS_WORTH = 16.0
BOUNDS_PROBE = 16


@dataclass(slots=True)
class Plan:
    now: float
    n: int
    W: float
    # The running requests' k's and deadlines (less margin), in finishing order, as they were when
    # planned: `Batch.add` inserts into copies of the live lists, so these stay put.
    ks: list[float]
    dues: list[float]
    light: bool  # offered load below `Tuning.light_load`
    # No candidate fits at all: the batch is at the model's size limit or a running TPOT target binds.
    full: bool
    v_more: float  # v(n + 1): the speed with the candidate alongside
    # The speed table, the prefill cost per estimated prompt token and the speed a fresh request of
    # the most demanding class needs, as they were when planned (none changes within a decision).
    table: list[float]
    per_token: float
    fresh_need: float
    # The earliest of `dues` (INF if none): with the speed table's ends, it bounds every slack in
    # the plan from below, which settles most candidates of a large, loose batch without the
    # replay (`fits_by_bounds`).
    min_due: float = INF
    # The replay itself, done on first need (`plan_loop`, `plan_lists`): `looped` once the ends
    # below are set. Seconds until the whole batch has finished, and the same had one more request
    # run alongside until then; the last request's remaining tokens (at least 1).
    looped: bool = False
    a0_end: float = 0.0
    a1_end: float = 0.0
    r_end: float = 0.0
    # The least slack left, among the requests on time, once slowed by one more: what a candidate
    # that finishes after the whole batch (most of them) is checked against.
    least: float = INF
    # Per (expected tokens, prompt tokens): where a candidate of that shape lands in the finishing
    # order and when it would finish. Candidates are priced by shape, and the window repeats shapes.
    shapes: dict[tuple[float, int], tuple[int, float, float, float, float]] = field(default_factory=dict)
    # Per running request, in finishing order (see `plan_lists`, which builds them on first need:
    # only a candidate that finishes inside the batch needs them, and few do).
    a0: list[float] | None = None
    a1: list[float] | None = None
    prefix_min: list[float] | None = None
    lenient: list[float] | None = None
    # Seconds until the engine has prefilled the prompts admitted before (`Batch.prefill_ahead`):
    # a candidate's first token, and so its whole run, waits for them.
    ahead: float = 0.0


class FeasibilityCheck:
    """Prices candidates against the running batch; owns its parameters and its caches (the
    inverse speeds, how well the bounds have been settling candidates)."""

    def __init__(self, batch: Batch, engine: EngineView, load: Load, p: SaberSchedulingConfig, t: Tuning) -> None:
        self.batch = batch
        self.engine = engine
        self.load = load
        self.margin = p.deadline_margin_seconds
        self.reserve = p.best_effort_reserve  # a cold candidate leaves the room best effort leaves
        self.headroom = 1.0 + t.speed_headroom
        self.reserve_share = t.slack_reserve_share
        self.at_risk = t.at_risk_slack_share
        self.inv: list[float] = []  # headroom / v(L), for the speed table `inv_for`
        self.inv_for: list[float] | None = None
        self.inv_sliced: dict[int, tuple[list[float], list[float]]] = {}  # n -> `_slices(n)`
        self.bounds_rate = 1.0  # share of recent `fits_by_bounds` tries that settled the candidate
        self.bounds_skipped = 0

    def plan(self, now: float) -> Plan:
        """The running batch as it stands, for `fits` to price candidates against; once per decision.

        The replay itself (requests finish in order of remaining tokens; while n run, each advances
        at v(n), less the headroom) is the one O(n) part of a decision (n = running requests), and
        it is done only when a candidate needs it (`plan_loop`, or `plan_lists` for a candidate
        finishing inside the batch): in a large batch with loose deadlines most candidates are
        settled by bounds on the replay that take O(1) (`fits_by_bounds`).
        """
        batch = self.batch
        engine = self.engine
        load = self.load
        table = engine.model.table
        if self.inv_for is not table:
            self._inverse_speeds()
        ks = batch.ks
        n = len(ks)
        max_tpot = batch.max_tpot() if batch.tpot_running else 0.0
        light_at = load.light_at
        light = (
            load.light
            if light_at is not None and light_at <= now and now - light_at <= LOAD_RECHECK_S
            else load.is_light(now)
        )
        # Full: at the model's size limit, at the engine's seats or the slow-start cap (never plan
        # for more running than the engine runs at once), or a running TPOT target binds.
        full = n + 2 >= len(table) or n >= engine.cap or max_tpot * self.headroom > table[n + 1]
        dues_sorted = batch.dues_sorted
        plan = Plan(
            now, n, batch.W, ks, batch.dues, light, full, 0.0 if full else table[n + 1], table, engine.per_token,
            load.fresh_need, dues_sorted[0] if dues_sorted else INF, not n,
        )
        end = batch.prefill_end  # `Batch.prefill_ahead`, inlined
        if end > now:
            plan.ahead = end - now
        return plan

    def _slices(self, n: int) -> tuple[list[float], list[float]]:
        """headroom / v at the batch size each of n requests, in finishing order, runs at: alone
        (inv[n - j] for request j) and with one more alongside (inv[n + 1 - j]); cached per n."""
        sliced = self.inv_sliced.get(n)
        if sliced is None:
            inv = self.inv
            sliced = self.inv_sliced[n] = (inv[n:0:-1], inv[n + 1 : 1 : -1])
        return sliced

    def plan_loop(self, plan: Plan) -> None:
        """The replay, keeping only what a candidate that finishes after the whole batch needs
        (most do): when the batch is done and the least slack in it.

        One tight loop over flat lists, the speeds pre-sliced to the batch sizes each request runs
        at. Measured on CPython 3.11: this loop beats map/accumulate stages (which allocate a list
        each), and storing each request's finishing time here (two list appends an element) cost
        more than building them apart for the few that need them (`plan_lists`).
        """
        now = plan.now
        W = plan.W
        ks = plan.ks
        dues = plan.dues
        n = plan.n
        w0s, w1s = self._slices(n)  # the speed table cannot change within a decision
        a0 = a1 = prev = 0.0
        least = INF
        if n and ks[0] - W < 1.0:
            # Requests past their estimate, a prefix (k is sorted): each has at least a token left.
            # Rare, so the loop below need not check.
            j = 0
            while j < n and ks[j] - W < 1.0:
                d = 1.0 - prev
                a0 += d * w0s[j]
                a1 += d * w1s[j]
                prev = 1.0
                s = dues[j] - now - a0
                if s >= 0.0:
                    s = s - a1 + a0
                    if s < least:
                        least = s
                j += 1
            rest = zip(ks[j:], dues[j:], w0s[j:], w1s[j:])
        else:
            rest = zip(ks, dues, w0s, w1s)
        # Request j finishes while n - j run (inv[n - j]); with one more alongside, inv[n + 1 - j].
        for k, due, w0, w1 in rest:
            r = k - W  # r = max(k - W, 1) as above: this far, k - W >= 1
            d = r - prev
            a0 += d * w0
            a1 += d * w1
            prev = r
            # Slack: deadline (less margin) minus finish; INF deadlines (best effort) protect nothing,
            # and a request late whatever we do holds nothing back.
            s = due - now - a0
            if s >= 0.0:
                s = s - a1 + a0
                if s < least:
                    least = s
        plan.a0_end, plan.a1_end, plan.r_end, plan.least = a0, a1, prev, least
        plan.looped = True

    def plan_lists(self, plan: Plan) -> None:
        """The per-request detail of `plan`, for candidates that finish inside the batch.

        `plan_loop`'s loop (the same arithmetic, so the last elements are `a0_end`, `a1_end` and
        `least` to the bit), keeping for each running request its finishing time alone and with
        one more alongside, the least slack among the requests up to it once slowed by one more
        (`prefix_min[j]`: before request j), and its lenient slack: INF where it is late anyway or
        within the model's error of missing (slack under `Tuning.at_risk_slack_share` of its time), which
        a shorter candidate may overtake.
        """
        now = plan.now
        W = plan.W
        tol = self.at_risk
        w0s, w1s = self._slices(plan.n)  # the speed table cannot change within a decision
        a0s: list[float] = []
        a1s: list[float] = []
        lenient: list[float] = []
        prefix: list[float] = [INF]
        add_a0, add_a1, add_lenient, add_prefix = a0s.append, a1s.append, lenient.append, prefix.append
        a0 = a1 = prev = 0.0
        least = INF
        for k, due, w0, w1 in zip(plan.ks, plan.dues, w0s, w1s):
            r = k - W
            if r < 1.0:
                r = 1.0
            d = r - prev
            a0 += d * w0
            a1 += d * w1
            prev = r
            add_a0(a0)
            add_a1(a1)
            s = due - now - a0
            add_lenient(s if s >= tol * a0 else INF)
            if s >= 0.0:
                s = s - a1 + a0
                if s < least:
                    least = s
            add_prefix(least)
        plan.a0, plan.a1, plan.prefix_min, plan.lenient = a0s, a1s, prefix, lenient
        if a0s:
            plan.a0_end, plan.a1_end, plan.r_end, plan.least = a0, a1, prev, least
        plan.looped = True

    def fits(
        self,
        plan: Plan,
        expected: float,
        deadline: float | None,
        tpot_speed: float,
        prompt: int = 0,
        span: float = 0.0,
        cold: bool = False,
    ) -> Fit:
        """Would the batch, with this candidate added now, still meet its deadlines?

        The candidate must meet its own deadline (when it has one), and no running SLA request
        that the plan has finishing in time may be pushed past its deadline. That invariant holds
        between admissions, because the batch only changes by admissions (checked) and finishes.
        The candidate's prefill stalls the whole batch for a moment. Requests finishing before
        the candidate are slowed by one more request plus that stall (a prefix minimum of the
        slack they would have left decides them); every one finishing after it is delayed by the
        same amount, so a suffix minimum of their slack decides them.
        """
        if plan.full:
            return HURTS
        if tpot_speed and tpot_speed * self.headroom > plan.v_more:
            return MISSES
        if cold:
            # Unprotected, like best effort, so it must leave the room best effort leaves for a
            # fresh request of the most demanding class.
            table = plan.table
            slot = plan.n + 1 + self.reserve
            if slot >= len(table) or table[slot] < plan.fresh_need * self.headroom:
                return HURTS
        priced = plan.shapes.get((expected, prompt))
        if priced is None:
            pos = self._position(plan, expected)
            if (not plan.looped if pos == plan.n else plan.a0 is None) and (
                self.bounds_rate * plan.n >= BOUNDS_WORTH or self.bounds_skipped >= BOUNDS_PROBE
            ):
                # The replay this candidate needs is not done yet: bounds on it may settle it
                # (tried where they have been settling enough candidates for the size of the
                # batch to pay for the try, and now and then to find out).
                fit = self.fits_by_bounds(plan, pos, expected, deadline, prompt, span, cold)
                self.bounds_skipped = 0
                self.bounds_rate += 0.125 * ((fit is not None) - self.bounds_rate)
                if fit is not None:
                    return fit
            else:
                self.bounds_skipped += 1
            priced = self._price(plan, pos, expected, prompt)
        pos, finish, stall, before0, r_prev = priced
        # The slack a candidate must leave: a share of its own time to deadline (best effort: of
        # its SLA, `span`), so a long request stops taking the batch's last slack while short,
        # urgent ones still can.
        now = plan.now
        if deadline is not None:
            reserve = self.reserve_share * (deadline - now)
            own = deadline - self.margin - reserve - now - finish - plan.ahead
            if own < 0.0 and not cold:
                return MISSES
            # A cold candidate's `expected` is its `max_tokens`, a bound most requests stop far
            # short of: missing its deadline at that length says little, and protecting it at
            # that length would hold every later admission back until it ends. It goes in
            # unprotected if it pushes no running request late, priced at that length (the
            # cautious side for the others).
            thin = cold or (plan.light and own < self.at_risk * finish)
        else:
            reserve = self.reserve_share * span
            thin = False
        # Requests finishing before the candidate: its prefill stall and the one more request
        # must not push them late; under light load the reserve is not asked of them (they are
        # short next to the candidate, and holding a long request back for their sake makes it
        # wait until it can only be admitted with thin slack).
        before = stall if plan.light else stall + reserve
        if pos == plan.n:
            return HURTS if plan.least < before else FIT_THIN if thin else FIT
        if plan.a0 is None:
            self.plan_lists(plan)
        if TYPE_CHECKING:  # `plan_lists` set them (no run-time check on this path)
            assert plan.prefix_min is not None and plan.lenient is not None
        if plan.prefix_min[pos] < before:
            return HURTS
        # Requests finishing after it, except those already within the model's error of
        # missing: a candidate that is done before them may overtake them.
        delay = finish - (before0 + (expected - r_prev) * self.headroom / plan.table[plan.n - pos])
        if min(plan.lenient[pos:]) < delay + reserve:
            return HURTS
        return FIT_THIN if thin else FIT

    def _position(self, plan: Plan, expected: float) -> int:
        """Where a candidate of `expected` tokens lands in `plan`'s finishing order: before the
        first request with at least that many tokens left (r = max(k - W, 1), as in the replay)."""
        ks = plan.ks
        W = plan.W
        n = plan.n
        # r never falls along the batch, so none has when the last has not (the common case: the
        # batch is done before the candidate).
        if not n or (ks[-1] - W < expected and 1.0 < expected):
            return n
        # A bisection of k against W + expected, corrected where that sum rounds.
        pos = bisect_left(ks, W + expected)
        # (r >= expected reads `k - W >= expected or 1.0 >= expected` without calling max.)
        while pos and (ks[pos - 1] - W >= expected or 1.0 >= expected):
            pos -= 1
        while pos < n and ks[pos] - W < expected and 1.0 < expected:
            pos += 1
        return pos

    def fits_by_bounds(
        self, plan: Plan, pos: int, expected: float, deadline: float | None, prompt: int, span: float, cold: bool
    ) -> Fit | None:
        """`fits`'s answer (past its first checks) where bounds on the replay settle it; None where
        they do not, and the replay decides.

        In the replay every request runs at the speed of a batch no larger than the one it starts
        in (n, or n + 1 with the candidate) and no smaller than the one it ends in, and its
        remaining tokens r are the sum of the steps before it, so request j finishes within
        [r_j h / v(n - j), r_j h / v(n)] (with one more: v(n + 1 - j), v(n + 1)). The earliest
        deadline in the batch then bounds every slack from below. With a large batch and loose
        deadlines (the sidecar under a steady load, a one-hour SLA) these settle almost every
        candidate, and a decision costs O(1) instead of O(n). Every comparison must clear a
        tolerance (relative 1e-9, where the floats' rounding is ~1e-16 a step) or the replay
        decides, so the verdict is the replay's, to the bit: one that bounds settle is the same
        one the replay would reach.
        """
        n = plan.n
        now = plan.now
        inv = self.inv
        table = plan.table
        h = self.headroom
        ks = plan.ks
        W = plan.W
        if pos:
            r_prev = ks[pos - 1] - W
            if r_prev < 1.0:
                r_prev = 1.0
            b1_lo = r_prev * inv[n + 2 - pos]
            b1_hi = r_prev * inv[n + 1]
            b0_lo = r_prev * inv[n + 1 - pos]
        else:
            r_prev = b1_lo = b1_hi = b0_lo = 0.0
        stall = plan.per_token * prompt
        rest = (expected - r_prev) * h / table[n + 1 - pos]
        f_lo = b1_lo + rest + stall
        f_hi = b1_hi + rest + stall
        min_due = plan.min_due
        scale = now if now >= 0.0 else -now
        scale += f_hi + span + 1.0
        if min_due < INF:
            scale += min_due if min_due >= 0.0 else -min_due
        if deadline is not None:
            scale += deadline if deadline >= 0.0 else -deadline
        if pos < n:
            r_last = ks[-1] - W
            if r_last < 1.0:
                r_last = 1.0
            a0_hi = r_last * inv[n]
            scale += a0_hi
        tol = 1e-9 * scale
        thin = False
        if deadline is not None:
            reserve = self.reserve_share * (deadline - now)
            room = deadline - self.margin - reserve - now - plan.ahead  # `own` is room - finish
            if cold:
                thin = True
            else:
                if room - f_lo < -tol:
                    return MISSES
                if not room - f_hi > tol:
                    return None
                if plan.light:
                    at_risk = self.at_risk
                    if room - f_lo - at_risk * f_lo < -tol:
                        thin = True
                    elif not room - f_hi - at_risk * f_hi > tol:
                        return None
        else:
            reserve = self.reserve_share * span
        before = stall if plan.light else stall + reserve
        if min_due < INF:
            base = min_due - now
            # The requests finishing before it (all of them when pos == n): slack once slowed.
            if pos and not base - b1_hi - before > tol:
                return None
            if pos < n:
                # Those finishing after it: delayed by at most this much.
                delay_hi = f_hi - (b0_lo + (expected - r_prev) * h / table[n - pos])
                if not base - a0_hi - delay_hi - reserve > tol:
                    return None
        return FIT_THIN if thin else FIT

    def _price(self, plan: Plan, pos: int, expected: float, prompt: int) -> tuple[int, float, float, float, float]:
        """When a candidate of this shape (at `pos`) would finish, its prefill stall, and the
        finishing time and remaining tokens of the request before it; cached in `plan.shapes`."""
        ks = plan.ks
        W = plan.W
        n = plan.n
        if pos == n and n:
            if not plan.looped:
                self.plan_loop(plan)
            before0, before1, r_prev = plan.a0_end, plan.a1_end, plan.r_end
        elif pos:
            r_prev = ks[pos - 1] - W
            if r_prev < 1.0:
                r_prev = 1.0
            if plan.a0 is None:
                self.plan_lists(plan)
            if TYPE_CHECKING:  # `plan_lists` set them (no run-time check on this path)
                assert plan.a0 is not None and plan.a1 is not None
            before0, before1 = plan.a0[pos - 1], plan.a1[pos - 1]
        else:
            before0 = before1 = r_prev = 0.0
        stall = plan.per_token * prompt
        finish = before1 + (expected - r_prev) * self.headroom / plan.table[n + 1 - pos] + stall
        priced = plan.shapes[(expected, prompt)] = (pos, finish, stall, before0, r_prev)
        return priced

    def _inverse_speeds(self) -> list[float]:
        """headroom / v(L) for every L, rebuilt only when the speed model changes (in numpy: the
        same IEEE divisions as a list comprehension, a tenth of the time after each refit)."""
        model = self.engine.model
        table = model.table
        if self.inv_for is not table:
            self.inv = (self.headroom / model.table_array).tolist()
            self.inv_for = table
            self.inv_sliced = {}
        return self.inv
