"""`saber`: our event-driven, deadline-aware admission policy.

Decisions happen when a request arrives, when one finishes, and on timers the policy asks for
(`next_wake`); there is no polling tick. This module holds `SaberPolicy`: its state and its entry
points. The rest of the class is in mixins, one module each, so that a decision is still method
calls on one object (CPython caches the lookups through the MRO):

- `saber_admit.py`: decisions: earliest deadline first with lookahead, best effort, admitting.
- `saber_replay.py`: the batch replay and the admission test (`_plan`, `_fits`).
- `saber_queue.py`: hopeless requests and their timers, demotion, rejection, Retry-After.
- `saber_load.py`: the offered load, and the largest batch a fresh request fits in.

Where it goes past the paper's Algorithm 1 (more in those modules' docstrings):

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
- Prefill: every admission makes the engine prefill the new prompt, which stalls every running
  request for `prompt_tokens x prefill cost` seconds. The cost starts at
  `initial_prefill_seconds_per_token` and is learned from time to first token: a low quantile of
  (TTFT - one step) / prompt tokens admitted within one step of each other (`PrefillCost`), which
  lands within 15% of the engine's cost at half, equal and twice the default (a
  least-squares slope was biased 60-170% high under sustained load and made the gate hold long
  prompts back). The stall is charged to the batch at admission (W steps back) and priced in
  `_fits`, and speed samples fed to the model are decode-only (stalls taken out).
- Cut-off requests (`finished(..., completed=False)`) free their slot but feed neither the
  output-length estimates nor the speed model.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right

from saber_sidecar.config import SidecarConfig
from saber_sidecar.policy.estimates import OutputEstimate, PrefillCost
from saber_sidecar.policy.base import (
    QUEUE_FULL,
    Action,
    EngineSnapshot,
    Policy,
    PolicyStats,
    Reject,
    Request,
)
from saber_sidecar.policy.saber_admit import REPLAYS_PER_DECISION, _AdmitMixin, _Run
from saber_sidecar.policy.saber_load import _LoadMixin
from saber_sidecar.policy.saber_queue import _Queued, _QueueMixin
from saber_sidecar.policy.saber_replay import FITS, HURTS_BATCH, INF, MISSES_OWN, _ReplayMixin
from saber_sidecar.speed_model import SpeedModel

__all__ = ["FITS", "HURTS_BATCH", "INF", "MISSES_OWN", "SaberPolicy"]

TTFT_EWMA = 0.2


class SaberPolicy(_AdmitMixin, _ReplayMixin, _QueueMixin, _LoadMixin, Policy):
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

    # -- the running integrals (the rest of the batch model is in saber_replay.py) -------------

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
