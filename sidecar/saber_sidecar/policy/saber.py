"""`saber`: our event-driven, deadline-aware admission policy.

Decisions happen when a request arrives, when one finishes, and on timers the policy asks for
(`next_wake`); there is no polling tick. Where it goes past the paper's Algorithm 1:

- Output length: each request is expected to produce the `output_quantile` (p90) of its class's
  recent output lengths once `output_min_samples` have finished (the class's `output_tokens`, or
  `max_tokens`, before that), capped by its `max_tokens`; the paper assumes `max_tokens`.
- Cold start: a request of a demote class that states no `output_tokens` and has learned none
  yet is cold: its `max_tokens` is only a bound (HumanEval: 384 against a median of ~48). It is
  not shed or demoted for that length; it is admitted, unprotected, as soon as it pushes no
  running request late when priced at `max_tokens` (the cautious side for the others) and leaves
  the room best effort leaves for fresh requests; it is demoted only when its deadline passes.
  Protecting it at `max_tokens` would hold every later admission back until it ends. Once its
  class has an estimate, a still-queued cold request takes it. Reject classes keep the strict
  reading of `max_tokens`.
- Speed: v(L) is refitted online from finished requests (`SpeedModel`).
- The batch: every running request's progress is tracked. All running requests advance at the
  model's v(L) while L run, so one running integral W(t) = ∫ v(L) dt gives each one's tokens so
  far (W(now) - W(admitted)) and so its remaining tokens. A decision plays the batch forward
  (`_plan`): requests finish in order of remaining tokens and the survivors speed up as L falls
  (v(n) less `speed_headroom` while n run). A candidate is admitted only if, with it added now,
  it finishes by its deadline (less `deadline_margin_seconds`) and no running SLA request that
  would otherwise be on time is pushed late. Admissions are the only way the batch grows, so this
  keeps every admitted request on time as far as the model can tell, without assuming the batch
  stays at L+1 for ever (which throttles the engine well below what it can carry). TPOT targets
  cap the batch at the L where v(L) still gives 1/tpot tokens per second.
- Prefill: every admission makes the engine prefill the new prompt, which stalls every running
  request for `prompt_tokens x prefill cost` seconds. The cost starts at
  `initial_prefill_seconds_per_token` and is learned from time to first token: a low quantile of
  (TTFT - one step) / prompt tokens admitted within one step of each other (`PrefillCost`), which
  lands within 15% of the engine's cost at half, equal and twice the default (a
  least-squares slope was biased 60-170% high under sustained load and made the gate hold long
  prompts back). The stall is charged to the batch at admission (W steps back) and priced in
  `_fits`, and speed samples fed to the model are decode-only (stalls taken out).
- Slack reserve: an admission must leave every running SLA request (and itself)
  `slack_reserve_share` x the candidate's own time to deadline as slack, so long requests stop
  taking the batch's last slack while short, urgent ones can still get in.
- Within the model's error: a running request predicted to finish with less slack than
  `at_risk_slack_share` of its remaining time may be overtaken by a shorter candidate (one that
  finishes first). Holding every arrival back for a request whose fate is a coin toss stalls the
  batch for its whole remaining life, and the requests held back are then admitted with thin
  slack themselves and hold back the next ones: under sustained load the gate ran the engine at
  a third of the batch it could carry.
- Light load: while the offered load (arrivals' expected tokens per second over
  `load_window_seconds`, against the most the engine delivers within the batch a fresh request
  fits in) is below `light_load`, the reserve is not asked of requests finishing before the
  candidate, and a candidate that only fits with thin slack (under `at_risk_slack_share` of its
  time) is admitted unprotected: it holds no later admission back. Near or over capacity the
  gate stays strict, because there it must choose which requests to serve and keep them on time.
- Order: SLA requests wait in earliest-deadline-first order. When the head needs a lighter batch
  than now runs, up to `lookahead` requests behind it are tried, so one demanding request does not
  block the others.
- Hopeless requests: a queued request is hopeless when it could not make its deadline even
  alone on the engine (needed speed above v(1)), or, under contention, only in a batch smaller than
  `shed_batch_fraction` x the SLA requests queued or running (capped by the batch a fresh request
  fits in): admitted late, such a request would throttle the engine for everyone until it ends,
  so it is shed early instead; also when its deadline has passed, or when its TTFT
  target would be missed (now + the measured admission-to-first-token time). A timer fires at the
  moment each queued request becomes hopeless. For classes with `on_miss: reject` the policy also
  predicts when the request could be admitted, draining the running batch at the model's speed
  and counting the SLA requests queued ahead of it as occupying slots; if that is too late, the
  request is rejected at once (429 with a Retry-After estimated from the batch) rather than after
  waiting. `on_miss: demote` requests become best effort, as in the paper.
- Best effort runs shortest weighted job first (expected tokens x SLA seconds: the order that
  minimises the mean of end-to-end time / SLA), alongside queued SLA requests, while the engine's
  KV cache is below `kv_cache_high`, it pushes no running SLA request late (with the slack
  reserve of its own SLA), and v(L + 1 + best_effort_reserve) still gives what a fresh
  request of the most demanding class needs (classes that could not be served in time even alone
  are left out of that), so best effort never takes the slots that SLA arrivals need. A demoted
  request that still finishes in time counts as met. Demoted requests go to the engine with
  `best_effort=True` (the proxy lowers their vLLM priority). The wait is bounded: a best-effort
  request still queued `best_effort_max_wait_slas` of its SLAs after arrival is rejected (429 with
  Retry-After), so demotion never turns into starvation under sustained load.
- Blocked by the batch: admission waits for a request to finish (or a timer), never for a tick.
  Arrivals that queue behind a blocked front are not replayed against the batch (O(log n) each).
- Bounded work: one decision replays the batch at most `REPLAYS_PER_DECISION` times; when more
  admissions may be possible it asks to be woken `min_recheck_seconds` later and goes on then.
  In a large batch with loose deadlines (the sidecar under a steady load with a long SLA), bounds
  on the replay settle most candidates without it (`_fits_by_bounds`; the verdict is the one the
  replay would reach), so such a decision costs O(1) in the batch size, not O(n).
- No deadlock: with nothing running, the head of the queue is admitted (or found hopeless and
  handled) unconditionally.
- Cut-off requests (`finished(..., completed=False)`) free their slot but feed neither the
  output-length estimates nor the speed model.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass, field

import numpy as np

from saber_sidecar.config import SidecarConfig
from saber_sidecar.policy.estimates import OutputEstimate, PrefillCost
from saber_sidecar.policy.base import (
    QUEUE_FULL,
    Action,
    Admit,
    Demote,
    EngineSnapshot,
    Policy,
    PolicyStats,
    Reject,
    Request,
)
from saber_sidecar.speed_model import SpeedModel

INF = math.inf
FITS, MISSES_OWN, HURTS_BATCH = "fits", "misses its own deadline", "pushes a running request late"
TTFT_EWMA = 0.2
LOAD_RECHECK_S = 0.25  # the offered load moves on a 10 s scale: re-checking it every decision is waste
REPLAYS_PER_DECISION = 1  # batch replays one decision may do; bounds its cost
# `_fits_by_bounds` costs about as much as replaying ~10-15 requests: it is tried while the share of
# candidates it settles times the batch size is at least BOUNDS_WORTH, and else every BOUNDS_PROBE-th.
BOUNDS_WORTH = 16.0
BOUNDS_PROBE = 16
_LS = np.arange(1025, dtype=float)  # L = 0 .. 1024, for `_fresh_limit_cached`


@dataclass(slots=True)
class _Queued:
    req: Request
    expected: int
    key: tuple[float, int, str]  # position in the EDF order
    tpot_speed: float
    due: float  # deadline less the margin: copied out of `req` for the decision's inner loop
    shape: tuple[int, int]  # (expected tokens, prompt tokens): candidates priced alike
    # Its class states no output length and has not learned one yet: `expected` is only
    # `max_tokens`, an upper bound (see `_cold`).
    cold: bool = False
    timer: int = 0  # generation of this request's current timer; older timers are stale


@dataclass(slots=True)
class _Plan:
    now: float
    n: int
    W: float
    # The running requests' k's and deadlines (less margin), in finishing order, as they were when
    # planned: `_admit` inserts into copies of the live lists, so these stay put.
    ks: list[float]
    dues: list[float]
    light: bool  # offered load below `light_load`
    # No candidate fits at all: the batch is at the model's size limit or a running TPOT target binds.
    full: bool
    v_more: float  # v(n + 1): the speed with the candidate alongside
    # The earliest of `dues` (INF if none): with the speed table's ends, it bounds every slack in
    # the plan from below, which settles most candidates of a large, loose batch without the
    # replay (`_fits_by_bounds`).
    min_due: float = INF
    # The replay itself, done on first need (`_plan_loop`, `_plan_lists`): `looped` once the ends
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
    shapes: dict = field(default_factory=dict)
    # Per running request, in finishing order (see `_plan_lists`, which builds them on first need:
    # only a candidate that finishes inside the batch needs them, and few do).
    a0: list[float] | None = None
    a1: list[float] | None = None
    prefix_min: list[float] | None = None
    lenient: list[float] | None = None


@dataclass(slots=True)
class _Run:
    req: Request
    k: float  # W at which it is predicted to finish: W(admitted) + expected tokens
    a0: float  # ∫L dt at admission, for the request's average concurrency
    t0: float
    sla: bool
    tpot_speed: float
    p0: float = 0.0  # prompt tokens admitted before it (the running total), for its prefill stalls
    n0: int = 1  # requests running once it was admitted
    burst: int = 0  # prompt tokens admitted at the same instant up to and including it: one prefill step


class SaberPolicy(Policy):
    name = "saber"

    def __init__(self, config: SidecarConfig) -> None:
        sched = config.scheduling
        p = sched.saber
        self.margin = p.deadline_margin_seconds
        self.headroom = 1.0 + p.speed_headroom
        self.lookahead = p.lookahead
        self.reserve = p.best_effort_reserve
        self.kv_high = p.kv_cache_high
        self.min_recheck = p.min_recheck_seconds
        self.shed = p.shed_batch_fraction
        self.reserve_share = p.slack_reserve_share
        self.at_risk = p.at_risk_slack_share
        self.be_wait = p.best_effort_max_wait_slas
        self.light_load = p.light_load
        self._thin = False  # the last candidate `_fits` passed would be admitted with thin slack
        self.load_tau = p.load_window_seconds
        self._offered = 0.0  # expected tokens per second arriving (exponentially weighted)
        self._offered_t = 0.0
        self._offered_start: float | None = None
        self._light = False
        self._light_at: float | None = None
        self._capacity = 1.0
        self.max_queue = sched.max_queue
        self.model = SpeedModel.from_config(sched.speed_model)
        self.classes = {c.name: c for c in config.classes}
        # Demote classes that state no output length: until they have learned one, their requests
        # are cold. (A reject class keeps the strict reading of `max_tokens`: its clients asked
        # for a 429 rather than a gamble.)
        self._unsized = {c.name: c.output_tokens is None and c.on_miss == "demote" for c in config.classes}
        self._estimates = {
            c.name: OutputEstimate(p.output_window, p.output_quantile, p.output_min_samples) for c in config.classes
        }
        self.ttft_estimate = p.initial_ttft_seconds
        self._prefill = PrefillCost(p.initial_prefill_seconds_per_token)
        self._P = 0.0  # prompt tokens admitted so far
        self._burst_at = -INF
        self._replays = REPLAYS_PER_DECISION
        self._resume_at: float | None = None  # a decision stopped at its work bound goes on then
        self._burst = 0
        # The running integrals: W = ∫ v(L) dt (tokens per request), A = ∫ L dt.
        self._W = 0.0
        self._A = 0.0
        self._t: float | None = None
        self._running: dict[str, _Run] = {}
        # (k, id, deadline less margin, INF for best effort) of running requests, by k
        self._by_finish: list[tuple[float, str, float]] = []
        self._ks: list[float] = []  # the same k's and deadlines, as flat lists for `_plan`
        self._dues: list[float] = []
        self._dues_sorted: list[float] = []  # the finite ones, ascending: `_Plan.min_due` in O(1)
        self._bounds_rate = 1.0  # share of recent `_fits_by_bounds` tries that settled the candidate
        self._bounds_skipped = 0
        self._sla_running = 0
        self._queued: dict[str, _Queued] = {}
        # Queued SLA requests, EDF: (deadline, seq, id, the _Queued). `q.key` (the first three)
        # bisects to a request's entry; seq is unique, so the _Queued is never compared.
        self._order: list[tuple[float, int, str, _Queued]] = []
        self._timers: list[tuple[float, int, str, int]] = []  # (when, seq, id, timer generation)
        # Best effort, shortest weighted job first: (expected tokens x SLA seconds, seq, id).
        self._be: list[tuple[float, int, str]] = []
        self._be_reqs: dict[str, _Queued] = {}
        # (when its wait runs out, seq, id) of best-effort requests, for the wait bound.
        self._be_expiry: list[tuple[float, int, str]] = []
        self._seq = 0
        self._tpot_running = 0  # running SLA requests with a TPOT target
        self._inv: list[float] = []
        self._version = 0  # bumped whenever the batch, the queue's front or an estimate changes
        self._blocked_at = -1  # the version at which the queue's front was last found blocked
        self._inv_for: list[float] | None = None
        self._inv_sliced: dict[int, tuple[list[float], list[float]]] = {}  # n -> `_plan`'s two slices of _inv
        self._kv_usage = 0.0
        self._fresh_need = self._compute_fresh_need()
        # `_fresh_limit_cached`: the speed table and fresh need it was computed for
        self._limit_table: list[float] | None = None
        self._limit_need = 0.0
        self._limit = 1

    # -- driver calls -------------------------------------------------------------------------

    def submit(self, req: Request, now: float) -> list[Action]:
        if req.id in self._queued or req.id in self._be_reqs or req.id in self._running:
            raise ValueError(f"request id {req.id!r} is already known to the policy")
        self._advance(now)
        if len(self._queued) + len(self._be_reqs) >= self.max_queue:
            return [Reject(req.id, QUEUE_FULL, retry_after_s=self._retry_after(now))]
        self._seq += 1
        est = self._estimates.get(req.sla_class)
        expected = req.expected_tokens
        cold = False
        if est is not None and est.value is not None:
            expected = est.value
        elif expected >= req.max_tokens and self._unsized.get(req.sla_class, False):
            cold = True
        expected = max(1, min(req.max_tokens, expected))
        self._note_arrival(expected, now)
        q = _Queued(
            req,
            expected,
            (req.deadline, self._seq, req.id),
            1.0 / req.tpot_target if req.tpot_target else 0.0,
            req.deadline - self.margin,
            (expected, req.prompt_tokens),
            cold,
        )
        out: list[Action] = []
        reason = self._hopeless(q, now)
        at = -1  # its place in the EDF order, once queued
        if reason:
            self._miss(q, now, reason, out)
        else:
            self._queued[req.id] = q
            entry = (*q.key, q)
            at = bisect_right(self._order, entry)
            self._order.insert(at, entry)
            self._set_timer(q, now)
        if self._blocked_at == self._version and at > self.lookahead:
            # Nothing has changed since the last decision found the queue's front blocked, and
            # this request queues behind the whole window that decision tried: it cannot change
            # the outcome, so skip replaying the batch (this keeps arrivals cheap when the queue
            # is long).
            self._fire_timers(now, out)
        else:
            out.extend(self._dispatch(now))
        if req.id in self._queued and req.on_miss == "reject":
            self._reject_if_late(q, now, out)
        return out

    def finished(
        self, request_id: str, now: float, output_tokens: int, first_token_at: float | None, *, completed: bool = True
    ) -> list[Action]:
        self._advance(now)
        self._version += 1
        run = self._running.pop(request_id, None)
        if run is None:
            return self._dispatch(now)
        # Its entry: the first with its k (a float bisection: cheaper than comparing tuples), then
        # past any others with the same k.
        by_finish = self._by_finish
        ks = self._ks
        i = bisect_left(ks, run.k)
        while by_finish[i][1] != request_id:
            i += 1
        due = self._dues[i]
        del by_finish[i], ks[i], self._dues[i]
        if due < INF:
            dues_sorted = self._dues_sorted
            del dues_sorted[bisect_left(dues_sorted, due)]
        if run.sla:
            self._sla_running -= 1
        if run.tpot_speed:
            self._tpot_running -= 1
        if first_token_at is not None and first_token_at >= run.t0:
            ttft = first_token_at - run.t0
            self.ttft_estimate += TTFT_EWMA * (ttft - self.ttft_estimate)
            self._prefill.observe(run.burst, ttft, 1.0 / self.model.speed(run.n0))
        duration = now - run.t0
        # A request cut off (client gone, engine error) says nothing about its class's output
        # length, and its speed sample would mix in the abort: learn only from complete ones.
        if completed and output_tokens > 0 and duration > 0:
            concurrency = (self._A - run.a0) / duration
            if not concurrency > 1.0:  # max(1.0, ...) without the call
                concurrency = 1.0
            # Admission to last token, prefill stalls taken out: the plan advances a request from
            # its admission at v(L) and charges stalls apart, so this is the speed it needs.
            stall = self._prefill.per_token * (self._P - run.p0)  # `PrefillCost.seconds`, inlined
            decode = duration - stall if duration - stall > 0.5 * duration else 0.5 * duration
            refitted = self.model.observe(concurrency, output_tokens / decode)
            est = self._estimates.get(run.req.sla_class)
            if (est is not None and est.add(output_tokens)) or refitted:
                self._fresh_need = self._compute_fresh_need()
        return self._dispatch(now)

    def cancel(self, request_id: str, now: float) -> list[Action]:
        q = self._queued.pop(request_id, None)
        if q is not None:
            i = bisect_left(self._order, q.key)
            del self._order[i]
            if i <= self.lookahead:
                self._version += 1  # the window the last decision tried has changed
        elif self._be_reqs.pop(request_id, None) is not None and not self._be_reqs:
            self._be.clear()
            self._be_expiry.clear()
        return []

    def wake(self, now: float) -> list[Action]:
        self._advance(now)
        return self._dispatch(now)

    def next_wake(self) -> float | None:
        timers = self._timers
        while timers:
            when, _, rid, gen = timers[0]
            q = self._queued.get(rid)
            if q is not None and q.timer == gen:
                break
            heapq.heappop(timers)
        first = timers[0][0] if timers else None
        expiry = self._be_expiry
        while expiry and expiry[0][2] not in self._be_reqs:
            heapq.heappop(expiry)
        if expiry and (first is None or expiry[0][0] < first):
            first = expiry[0][0]
        resume = self._resume_at
        if resume is not None and (first is None or resume < first):
            return resume
        return first

    def observe_engine(self, snapshot: EngineSnapshot, now: float) -> list[Action]:
        was_high = self._kv_usage >= self.kv_high
        self._version += 1
        self._kv_usage = snapshot.kv_cache_usage
        if was_high and self._kv_usage < self.kv_high and self._be:
            self._advance(now)
            return self._dispatch(now)
        return []

    def stats(self) -> PolicyStats:
        L = len(self._running)
        return PolicyStats(
            queued_sla=len(self._queued),
            queued_best_effort=len(self._be_reqs),
            running=L,
            admission_limit=self._fresh_limit(),
            predicted_speed=self.model.speed(L + 1),
            speed_model_r2=self.model.r2,
            speed_model_error_ratio=self.model.error_ratio,
            extra={
                "ttft_estimate_seconds": self.ttft_estimate,
                "speed_model_refits": float(self.model.refits),
                "sla_running": float(self._sla_running),
                "offered_load_ratio": self._load(self._t) if self._t is not None else 0.0,
                "prefill_seconds_per_token": self._prefill.per_token,
            },
        )

    def expected_tokens(self, sla_class: str) -> int | None:
        """The class's current online output-length estimate, if it has one yet."""
        est = self._estimates.get(sla_class)
        return est.value if est is not None else None

    # -- the batch model -----------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        if self._t is None:
            self._t = now
            return
        dt = now - self._t
        if dt > 0:
            L = len(self._running)
            if L:
                table = self.model.table
                self._W += (table[L] if L < len(table) else self.model.speed(L)) * dt
                self._A += L * dt
            self._t = now

    def _plan(self, now: float) -> _Plan:
        """The running batch as it stands, for `_fits` to price candidates against; once per decision.

        The replay itself (requests finish in order of remaining tokens; while n run, each advances
        at v(n), less the headroom) is the one O(n) part of a decision (n = running requests), and
        it is done only when a candidate needs it (`_plan_loop`, or `_plan_lists` for a candidate
        finishing inside the batch): in a large batch with loose deadlines most candidates are
        settled by bounds on the replay that take O(1) (`_fits_by_bounds`).
        """
        table = self.model.table
        if self._inv_for is not table:
            self._inverse_speeds()
        ks = self._ks
        n = len(ks)
        max_tpot = self._max_running_tpot() if self._tpot_running else 0.0
        light_at = self._light_at
        light = (
            self._light
            if light_at is not None and light_at <= now and now - light_at <= LOAD_RECHECK_S
            else self._is_light(now)
        )
        full = n + 2 >= len(table) or max_tpot * self.headroom > table[n + 1]
        dues_sorted = self._dues_sorted
        return _Plan(
            now, n, self._W, ks, self._dues, light, full, 0.0 if full else table[n + 1],
            dues_sorted[0] if dues_sorted else INF, not n,
        )

    def _slices(self, n: int) -> tuple[list[float], list[float]]:
        """headroom / v at the batch size each of n requests, in finishing order, runs at: alone
        (inv[n - j] for request j) and with one more alongside (inv[n + 1 - j]); cached per n."""
        sliced = self._inv_sliced.get(n)
        if sliced is None:
            inv = self._inv
            sliced = self._inv_sliced[n] = (inv[n:0:-1], inv[n + 1 : 1 : -1])
        return sliced

    def _plan_loop(self, plan: _Plan) -> None:
        """The replay, keeping only what a candidate that finishes after the whole batch needs
        (most do): when the batch is done and the least slack in it.

        One tight loop over flat lists, the speeds pre-sliced to the batch sizes each request runs
        at. Measured on CPython 3.11: this loop beats map/accumulate stages (which allocate a list
        each), and storing each request's finishing time here (two list appends an element) cost
        more than building them apart for the few that need them (`_plan_lists`).
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

    def _plan_lists(self, plan: _Plan) -> None:
        """The per-request detail of `plan`, for candidates that finish inside the batch.

        `_plan_loop`'s loop (the same arithmetic, so the last elements are `a0_end`, `a1_end` and
        `least` to the bit), keeping for each running request its finishing time alone and with
        one more alongside, the least slack among the requests up to it once slowed by one more
        (`prefix_min[j]`: before request j), and its lenient slack: INF where it is late anyway or
        within the model's error of missing (slack under `at_risk_slack_share` of its time), which
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

    def _fits(
        self,
        plan: _Plan,
        expected: float,
        deadline: float | None,
        tpot_speed: float,
        prompt: int = 0,
        span: float = 0.0,
        cold: bool = False,
    ) -> str:
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
            return HURTS_BATCH
        if tpot_speed and tpot_speed * self.headroom > plan.v_more:
            return MISSES_OWN
        if cold:
            # Unprotected, like best effort, so it must leave the room best effort leaves for a
            # fresh request of the most demanding class.
            table = self.model.table
            slot = plan.n + 1 + self.reserve
            if slot >= len(table) or table[slot] < self._fresh_need * self.headroom:
                return HURTS_BATCH
        priced = plan.shapes.get((expected, prompt))
        if priced is None:
            pos = self._position(plan, expected)
            if (not plan.looped if pos == plan.n else plan.a0 is None) and (
                self._bounds_rate * plan.n >= BOUNDS_WORTH or self._bounds_skipped >= BOUNDS_PROBE
            ):
                # The replay this candidate needs is not done yet: bounds on it may settle it
                # (tried where they have been settling enough candidates for the size of the
                # batch to pay for the try, and now and then to find out).
                verdict = self._fits_by_bounds(plan, pos, expected, deadline, prompt, span, cold)
                self._bounds_skipped = 0
                self._bounds_rate += 0.125 * ((verdict is not None) - self._bounds_rate)
                if verdict is not None:
                    return verdict
            else:
                self._bounds_skipped += 1
            priced = self._price(plan, pos, expected, prompt)
        pos, finish, stall, before0, r_prev = priced
        # The slack a candidate must leave: a share of its own time to deadline (best effort: of
        # its SLA, `span`), so a long request stops taking the batch's last slack while short,
        # urgent ones still can.
        now = plan.now
        if deadline is not None:
            reserve = self.reserve_share * (deadline - now)
            own = deadline - self.margin - reserve - now - finish
            if own < 0.0 and not cold:
                return MISSES_OWN
            # A cold candidate's `expected` is its `max_tokens`, a bound most requests stop far
            # short of: missing its deadline at that length says little, and protecting it at
            # that length would hold every later admission back until it ends. It goes in
            # unprotected if it pushes no running request late, priced at that length (the
            # cautious side for the others).
            self._thin = cold or (plan.light and own < self.at_risk * finish)
        else:
            reserve = self.reserve_share * span
            self._thin = False
        # Requests finishing before the candidate: its prefill stall and the one more request
        # must not push them late; under light load the reserve is not asked of them (they are
        # short next to the candidate, and holding a long request back for their sake makes it
        # wait until it can only be admitted with thin slack).
        before = stall if plan.light else stall + reserve
        if pos == plan.n:
            return HURTS_BATCH if plan.least < before else FITS
        if plan.a0 is None:
            self._plan_lists(plan)
        if plan.prefix_min[pos] < before:
            return HURTS_BATCH
        # Requests finishing after it, except those already within the model's error of
        # missing: a candidate that is done before them may overtake them.
        delay = finish - (before0 + (expected - r_prev) * self.headroom / self.model.table[plan.n - pos])
        if min(plan.lenient[pos:]) < delay + reserve:
            return HURTS_BATCH
        return FITS

    def _position(self, plan: _Plan, expected: float) -> int:
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

    def _fits_by_bounds(
        self, plan: _Plan, pos: int, expected: float, deadline: float | None, prompt: int, span: float, cold: bool
    ) -> str | None:
        """`_fits`'s verdict (past its first checks) where bounds on the replay settle it; None where
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
        inv = self._inv
        table = self.model.table
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
        stall = self._prefill.per_token * prompt
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
            room = deadline - self.margin - reserve - now  # `own` is room - finish
            if cold:
                thin = True
            else:
                if room - f_lo < -tol:
                    return MISSES_OWN
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
        self._thin = thin
        return FITS

    def _price(self, plan: _Plan, pos: int, expected: float, prompt: int) -> tuple[int, float, float, float, float]:
        """When a candidate of this shape (at `pos`) would finish, its prefill stall, and the
        finishing time and remaining tokens of the request before it; cached in `plan.shapes`."""
        ks = plan.ks
        W = plan.W
        n = plan.n
        if pos == n and n:
            if not plan.looped:
                self._plan_loop(plan)
            before0, before1, r_prev = plan.a0_end, plan.a1_end, plan.r_end
        elif pos:
            r_prev = ks[pos - 1] - W
            if r_prev < 1.0:
                r_prev = 1.0
            if plan.a0 is None:
                self._plan_lists(plan)
            before0, before1 = plan.a0[pos - 1], plan.a1[pos - 1]
        else:
            before0 = before1 = r_prev = 0.0
        stall = self._prefill.per_token * prompt
        finish = before1 + (expected - r_prev) * self.headroom / self.model.table[n + 1 - pos] + stall
        priced = plan.shapes[(expected, prompt)] = (pos, finish, stall, before0, r_prev)
        return priced

    def _inverse_speeds(self) -> list[float]:
        """headroom / v(L) for every L, rebuilt only when the speed model changes (in numpy: the
        same IEEE divisions as a list comprehension, a tenth of the time after each refit)."""
        table = self.model.table
        if self._inv_for is not table:
            self._inv = (self.headroom / self.model.table_array).tolist()
            self._inv_for = table
            self._inv_sliced = {}
        return self._inv

    def _max_running_tpot(self) -> float:
        return max((r.tpot_speed for r in self._running.values()), default=0.0)

    def _shed_speed(self) -> float:
        """The most speed a queued request may still need and be kept waiting for.

        A request admitted late needs a fast, hence small, batch until it is done, and every
        admission after it must keep it on time: under contention one such request throttles the
        engine for everyone. So while `contenders` SLA requests are queued or running, a request
        that would need more than v(shed_batch_fraction x min(contenders, fresh limit)) is shed
        (demoted or rejected) rather than admitted; with nothing else around, the floor is one
        request alone on the engine, as in the paper.
        """
        table = self.model.table
        if self.shed <= 0.0:
            return table[1]
        contenders = len(self._queued) + self._sla_running
        if self._limit_table is table and self._limit_need == self._fresh_need:
            limit = self._limit
        else:
            limit = self._fresh_limit_cached()
        floor = int(self.shed * (contenders if contenders < limit else limit))
        return table[floor] if floor > 1 else table[1]

    def _hopeless(self, q: _Queued, now: float) -> str | None:
        if q.due <= now:
            return "deadline cannot be met"
        if q.cold and not self._warm_up(q):
            ttft = q.req.ttft_deadline
            if ttft is not None and now + self.ttft_estimate > ttft - self.margin:
                return "time-to-first-token target cannot be met"
            return None
        # The speed it needs: its tokens over the time left (ahead here), or its TPOT speed if higher.
        need = q.expected / (q.due - now)
        if need <= q.tpot_speed:
            need = q.tpot_speed
        if need > self.model.table[1]:
            return "deadline needs more than the engine's single-request speed"
        if need > self._shed_speed():
            return "deadline needs a batch too small for the load"
        ttft = q.req.ttft_deadline
        if ttft is not None and now + self.ttft_estimate > ttft - self.margin:
            return "time-to-first-token target cannot be met"
        return None

    def _hopeless_at(self, q: _Queued) -> float:
        t = q.due if q.cold else q.due - q.expected / self._shed_speed()
        if q.tpot_speed > self.model.table[1]:
            t = -INF
        if q.req.ttft_deadline is not None:
            t = min(t, q.req.ttft_deadline - self.margin - self.ttft_estimate)
        return t

    def _warm_up(self, q: _Queued) -> bool:
        """A cold request whose class has learned its output length since it queued takes that estimate."""
        value = self._estimates[q.req.sla_class].value
        if value is None:
            return False
        q.expected = max(1, min(q.req.max_tokens, value))
        q.shape = (q.expected, q.req.prompt_tokens)
        q.cold = False
        return True

    def _set_timer(self, q: _Queued, now: float, when: float | None = None) -> None:
        q.timer += 1
        at = self._hopeless_at(q) if when is None else when
        heapq.heappush(self._timers, (max(at, now), q.key[1], q.req.id, q.timer))

    # -- decisions -----------------------------------------------------------------------------

    def _dispatch(self, now: float) -> list[Action]:
        out: list[Action] = []
        self._replays = REPLAYS_PER_DECISION
        if self._resume_at is not None and now >= self._resume_at:
            self._resume_at = None
        # The timer and wait-bound handlers are entered only when one is due (or, for the wait
        # bound, when its heaps are to be cleared): most decisions have none, and the call costs
        # more than the test.
        timers = self._timers
        if timers and timers[0][0] <= now:
            self._fire_timers(now, out)
        expiry = self._be_expiry
        if expiry and (expiry[0][0] <= now or not self._be_reqs):
            self._expire_best_effort(now, out)
        if self._order:
            self._admit_sla(now, out)
        if self._be:
            self._admit_best_effort(now, out)
        return out

    def _fire_timers(self, now: float, out: list[Action]) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, rid, gen = heapq.heappop(timers)
            q = self._queued.get(rid)
            if q is None or q.timer != gen:
                continue
            reason = self._hopeless(q, now)
            if not reason and now >= self._hopeless_at(q) - 1e-9:
                # Its last chance has come and it is still queued: by the next event it is late.
                reason = "deadline cannot be met"
                if q.req.ttft_deadline is not None and now >= q.req.ttft_deadline - self.margin - self.ttft_estimate - 1e-9:
                    reason = "time-to-first-token target cannot be met"
            if reason:
                self._dequeue(q)
                self._miss(q, now, reason, out)
            elif q.req.on_miss == "reject":
                self._reject_if_late(q, now, out)
            else:
                self._set_timer(q, now, max(self._hopeless_at(q), now + self.min_recheck))

    def _replay(self, now: float) -> _Plan | None:
        """A fresh plan, or None when this decision has used its replays (it resumes shortly)."""
        if self._replays <= 0:
            self._resume_at = now + self.min_recheck
            return None
        self._replays -= 1
        return self._plan(now)

    def _admit_sla(self, now: float, out: list[Action]) -> None:
        """EDF: admit the head while it fits; past a head that does not, try up to `lookahead` more.

        One scan of the window, with bounded work. Admitting only ever grows the batch, so a
        candidate that failed against the batch before an admission fails after it too; the
        batch is replayed (`_plan`) only for a candidate that passed against an outdated plan,
        and at most `REPLAYS_PER_DECISION` times: past that the decision stops and asks to be
        woken `min_recheck_seconds` later to go on. A candidate that would push a running request
        late rules out every later one with the same length and prompt (their slack reserve is
        no smaller), so each (length, prompt) is priced once per scan.
        """
        order = self._order
        queued = self._queued
        running = self._running
        # An empty engine takes the head unconditionally (no deadlock), unless it is hopeless.
        while not running and order:
            q = order[0][3]
            reason = self._hopeless(q, now)
            del order[0]
            del queued[q.req.id]
            if reason:
                self._miss(q, now, reason, out)
            else:
                self._admit(q.req, q.expected, q.tpot_speed, now, out, protect=not q.cold)
        if not order:
            return
        lookahead = self.lookahead
        fits = self._fits
        plan: _Plan | None = None
        stale = True
        hurt: set[tuple[int, int]] = set()
        # Queued requests that became hopeless were handled by their timers, which fire first
        # in every decision, but the load may have grown since (`_shed_speed`); `_fits` checks
        # each deadline against the batch. (The speed each needs is worked out inline: this loop
        # runs for the whole window.)
        shed_v = self._shed_speed()
        i = 0
        tried = 0
        # The window from i: the most candidates this scan may still try. A `for` over a slice
        # beats indexing the live list (measured ~40% less per candidate, and most candidates are
        # only shed-checked and passed over); a candidate leaving the queue ends the slice, and the
        # scan goes on from the same position in the shortened queue.
        while tried <= lookahead:
            for entry in order[i : i + lookahead + 1 - tried]:
                q = entry[3]
                if q.cold:
                    self._warm_up(q)
                slack = q.due - now
                if slack <= 0.0 or (not q.cold and (q.expected / slack > shed_v or q.tpot_speed > shed_v)):
                    del order[i]
                    del queued[q.req.id]
                    self._miss(q, now, "deadline needs a batch too small for the load", out)
                    break
                tried += 1
                shape = q.shape
                if hurt and shape in hurt:
                    i += 1
                    continue
                if plan is None:
                    if self._replays <= 0:  # `_replay`, inlined
                        self._resume_at = now + self.min_recheck
                        return
                    self._replays -= 1
                    plan, stale = self._plan(now), False
                req = q.req
                verdict = fits(plan, q.expected, req.deadline, q.tpot_speed, req.prompt_tokens, 0.0, q.cold)
                if verdict is FITS and stale:
                    plan, stale = self._replay(now), False
                    if plan is None:
                        return
                    verdict = fits(plan, q.expected, req.deadline, q.tpot_speed, req.prompt_tokens, 0.0, q.cold)
                if verdict is HURTS_BATCH:
                    hurt.add(shape)
                elif verdict is FITS:
                    del order[i]
                    del queued[req.id]
                    self._admit(req, q.expected, q.tpot_speed, now, out, protect=not self._thin)
                    stale = True
                    tried -= 1
                    break
                i += 1
            else:
                break  # the window was tried (or the queue ended) with no one leaving it
        if order:
            self._blocked_at = self._version

    def _admit_best_effort(self, now: float, out: list[Action]) -> None:
        """FIFO, and only while a fresh SLA arrival would still find room (see module docstring)."""
        table = self.model.table
        while self._be:
            rid = self._be[0][2]
            q = self._be_reqs.get(rid)
            if q is None:
                heapq.heappop(self._be)
                continue
            L = len(self._running)
            if L:
                if self._kv_usage >= self.kv_high:
                    return
                slot = L + 1 + self.reserve
                if slot >= len(table) or table[slot] < self._fresh_need * self.headroom:
                    return
                plan = self._replay(now)
                span = q.req.deadline - q.req.arrival
                if plan is None or self._fits(plan, q.expected, None, 0.0, q.req.prompt_tokens, span) is not FITS:
                    return
            heapq.heappop(self._be)
            del self._be_reqs[rid]
            self._admit(q.req, q.expected, 0.0, now, out)

    def _expire_best_effort(self, now: float, out: list[Action]) -> None:
        """Reject best-effort requests that have waited `best_effort_max_wait_slas` SLAs: a bounded wait."""
        expiry = self._be_expiry
        while expiry and expiry[0][0] <= now:
            _, _, rid = heapq.heappop(expiry)
            if self._be_reqs.pop(rid, None) is not None:
                out.append(Reject(rid, "best-effort wait bound reached", retry_after_s=self._retry_after(now)))
        if not self._be_reqs:
            self._be.clear()

    def _admit(
        self, req: Request, expected: int, tpot_speed: float, now: float, out: list[Action], protect: bool = True
    ) -> None:
        req.admitted_at = now
        self._version += 1
        sla = not req.best_effort
        k = self._W + expected
        due = req.deadline - self.margin if sla and protect else INF
        running = self._running
        run = _Run(req, k, self._A, now, sla, tpot_speed if sla else 0.0, self._P, len(running) + 1)
        running[req.id] = run
        key = (k, req.id, due)
        by_finish = self._by_finish
        ks = self._ks
        # Where `key` goes in `by_finish`: a float bisection on k, and only among equal k's (rare)
        # one on the tuples.
        i = bisect_left(ks, k)
        if i < len(ks) and ks[i] == k:
            i = bisect_left(by_finish, key, i, bisect_right(ks, k, i))
        by_finish.insert(i, key)
        # Into copies: the decision's plan holds the old lists and prices later candidates
        # against them (cheaper than copying at every plan; admissions are rarer).
        self._ks = ks = ks.copy()
        ks.insert(i, k)
        self._dues = dues = self._dues.copy()
        dues.insert(i, due)
        if due < INF:
            insort(self._dues_sorted, due)
        if req.prompt_tokens:
            # Requests admitted within one engine step of each other are prefilled in the same
            # step (or queue behind each other), so the first token of each waits for all their
            # prompts: that running sum is what its TTFT is regressed on.
            if now - self._burst_at > self.model.table[len(self._running)] ** -1:
                self._burst_at, self._burst = now, 0
            self._burst += req.prompt_tokens
            run.burst = self._burst
            # Its prefill holds up every running request (itself included) for a moment.
            self._P += req.prompt_tokens
            self._W -= self.model.speed(len(self._running)) * self._prefill.seconds(req.prompt_tokens)
        if sla:
            self._sla_running += 1
        if run.tpot_speed:
            self._tpot_running += 1
        out.append(Admit(req.id, req.best_effort))

    def _dequeue(self, q: _Queued) -> None:
        del self._queued[q.req.id]
        del self._order[bisect_left(self._order, q.key)]

    def _miss(self, q: _Queued, now: float, reason: str, out: list[Action]) -> None:
        req = q.req
        if req.on_miss == "reject":
            out.append(Reject(req.id, reason, retry_after_s=self._retry_after(now)))
            return
        req.best_effort = True
        heapq.heappush(self._be, (q.expected * (req.deadline - req.arrival), q.key[1], req.id))
        self._be_reqs[req.id] = q
        if self.be_wait > 0.0:
            expiry = req.arrival + self.be_wait * (req.deadline - req.arrival)
            heapq.heappush(self._be_expiry, (max(expiry, now), q.key[1], req.id))
        out.append(Demote(req.id, reason))

    def _reject_if_late(self, q: _Queued, now: float, out: list[Action]) -> None:
        """For reject classes: reject now if the request is predicted not to get in in time."""
        if q.cold and not self._warm_up(q):
            self._set_timer(q, now)  # its length is unknown: it waits for its chance until its deadline
            return
        eta = self._admission_eta(q, now)
        if eta is None:
            self._dequeue(q)
            out.append(Reject(q.req.id, "predicted to miss its deadline", retry_after_s=self._retry_after(now)))
            return
        hopeless = self._hopeless_at(q)
        when = eta if now + self.min_recheck < eta < hopeless else hopeless
        self._set_timer(q, now, max(when, now + self.min_recheck))

    def _admission_eta(self, q: _Queued, now: float) -> float | None:
        """Earliest time the running batch will have drained enough to admit `q`, or None if too late.

        SLA requests queued ahead of `q` are counted as taking slots and never leaving (a
        deliberately cautious view); running requests drain at the model's speed.
        """
        speed = self.model.speed
        ahead = bisect_left(self._order, q.key)
        L_eff = len(self._running) + ahead
        W = self._W
        D = q.req.deadline - self.margin
        v1 = speed(1)
        latest = D - q.expected / v1
        t = now
        gen = 0.0
        for k, _, _ in self._by_finish:
            if t > latest:
                return None
            need = max(q.expected / (D - t), q.tpot_speed)
            if speed(L_eff + 1) / self.headroom >= need:
                return t
            rem = k - W
            if rem > gen:
                t += (rem - gen) / speed(L_eff)
                gen = rem
            L_eff -= 1
        if t > latest:
            return None
        need = max(q.expected / (D - t), q.tpot_speed)
        if (L_eff == 0 and need <= v1) or speed(L_eff + 1) / self.headroom >= need:
            return t
        return None

    def _retry_after(self, now: float) -> float:
        """Seconds until the engine is predicted to have room, counting the queued SLA requests."""
        L = len(self._running)
        if not L:
            return 0.1
        v = self.model.speed(L)
        first = max(self._by_finish[0][0] - self._W, 0.0) / v
        drain = max(self._by_finish[-1][0] - self._W, 0.0) / v
        estimate = first + drain / L * len(self._queued)
        return min(60.0, max(0.1, estimate))

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
        """The largest batch at which a fresh request of every class is still predicted to fit."""
        if self._fresh_need <= 0:
            return None
        table = self.model.table
        target = self._fresh_need * self.headroom
        lo, hi = 0, len(table) - 1
        if table[1] < target:
            return 0
        while lo < hi:  # table is non-increasing: find the last L with table[L] >= target
            mid = (lo + hi + 1) // 2
            if table[mid] >= target:
                lo = mid
            else:
                hi = mid - 1
        return lo
