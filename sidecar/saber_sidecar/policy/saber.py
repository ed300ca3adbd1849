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
  class has an estimate, a still-queued cold request takes it. A reject class explores the same
  way with at most `output_min_samples` cold requests running at once, so an honest `max_tokens`
  that cannot be met costs a few probes and then gets the strict reading.
- The engine: planned with `EngineModel` (engine_model.py), step time t0 + t1 L + t2 L^2 + c P
  learned online from completed requests' decode spans and times to first token and from the
  engine's step counters, starting from the configured prior (`engine_profile`, else the speed
  curve and `initial_prefill_seconds_per_token`). Every admission makes the engine prefill the new
  prompt, which stalls every running request for `prompt_tokens x c` seconds: charged to the batch
  at admission (W steps back) and priced in `_fits`. Prompt tokens are the sidecar's estimate,
  scaled to the engine's count by a learned ratio (usage, else the engine's prompt counter).
- Safe until learned: a slow-start cap on running (8, then 2x the largest batch completed
  requests ran at) until observations confirm the model, and never more running than the
  engine's seats (`engine_max_num_seqs`, or what its running/waiting metrics show).
- Cut-off requests (`finished(..., completed=False)`) free their slot but feed neither the
  output-length estimates nor the speed model.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right

from saber_sidecar.config import SidecarConfig
from saber_sidecar.policy.base import (
    QUEUE_FULL,
    Action,
    EngineSnapshot,
    Policy,
    PolicyStats,
    Reject,
    Request,
)
from saber_sidecar.policy.engine_model import EngineModel, engine_model_for
from saber_sidecar.policy.estimates import OutputEstimate
from saber_sidecar.policy.saber_admit import REPLAYS_PER_DECISION, _AdmitMixin, _Run
from saber_sidecar.policy.saber_load import _LoadMixin
from saber_sidecar.policy.saber_queue import _Queued, _QueueMixin
from saber_sidecar.policy.saber_replay import FITS, HURTS_BATCH, INF, MISSES_OWN, _ReplayMixin
from saber_sidecar.policy.saber_tuning import DEFAULT_TUNING, Tuning

__all__ = ["FITS", "HURTS_BATCH", "INF", "MISSES_OWN", "SaberPolicy"]

TTFT_EWMA = 0.2
RATIO_EWMA = 0.1
RATIO_MIN_TOKENS = 2000  # estimated prompt tokens before the engine's counter corrects the estimate


class PlanPrefill:
    """Seconds of engine stall per estimated prompt token: the model's cost x the token ratio."""

    __slots__ = ("per_token",)

    def __init__(self, per_token: float) -> None:
        self.per_token = per_token

    def seconds(self, prompt_tokens: float) -> float:
        return self.per_token * prompt_tokens
INF_SEATS = 1 << 30
SLOW_START_MIN = 8  # batch the gate may plan for before any request has completed
SLOW_START_FACTOR = 2.0  # how far past the largest batch completed requests have run it plans
# Observations (completed requests, busy scrape intervals of the engine's step counters) that
# must confirm the model before the slow-start cap lifts, within this log(observed / predicted)
# (about 25% slower than predicted; faster counts as 0); one within a quarter of that is enough.
SLOW_START_CONFIRM = 4
SLOW_START_ERROR = 0.25
ERROR_EWMA = 0.2
LOG_MAX = 1 << 15
COUNTER_MIN_STEPS = 8  # engine steps in a span worth learning from
CLUSTER_SHARE = 1.0  # of its cluster-mates admitted after it that a decode span is taken to include
COUNTER_SPAN_S = 2.0  # a span of the engine's counters: long next to the bursts it publishes them in
BUSY_SHARE = 0.98  # share of a scrape interval the gate must have had requests running


def _seat_bound(prev: EngineSnapshot, cur: EngineSnapshot) -> bool:
    """Whether requests waited between two scrapes for a seat, not for the token budget: the
    engine made steps and prefilled no prompt tokens meanwhile (True when it exports no counters)."""
    if cur.steps is None or prev.steps is None or cur.prompt_tokens is None or prev.prompt_tokens is None:
        return True
    return cur.steps > prev.steps and cur.prompt_tokens <= prev.prompt_tokens


class SaberPolicy(_AdmitMixin, _ReplayMixin, _QueueMixin, _LoadMixin, Policy):
    name = "saber"

    def __init__(self, config: SidecarConfig, tuning: Tuning = DEFAULT_TUNING, model: EngineModel | None = None) -> None:
        """`tuning`: the internal constants (saber_tuning.py), varied by tests and benchmarks only;
        `model`: an engine model to start from instead of the one the config's prior gives."""
        sched = config.scheduling
        p = sched.saber
        t = tuning
        self.margin = p.deadline_margin_seconds
        self.headroom = 1.0 + t.speed_headroom
        self.lookahead = t.lookahead
        self.reserve = p.best_effort_reserve
        self.kv_high = p.kv_cache_high
        self.min_recheck = t.min_recheck_seconds
        self.shed = p.shed_batch_fraction
        self.reserve_share = t.slack_reserve_share
        self.at_risk = t.at_risk_slack_share
        self.be_wait = p.best_effort_max_wait_slas
        self.light_load = t.light_load
        self._thin = False  # the last candidate `_fits` passed would be admitted with thin slack
        self.load_tau = t.load_window_seconds
        self._offered = 0.0  # expected tokens per second arriving (exponentially weighted)
        self._offered_t = 0.0
        self._offered_start: float | None = None
        self._light = False
        self._light_at: float | None = None
        self._capacity = 1.0
        self.max_queue = sched.max_queue
        self.model = engine_model_for(sched) if model is None else model
        # What the engine model's prior rests on: a reload that keeps it keeps what was learned.
        self._prior_key = (sched.speed_model, sched.engine_profile, self.model.per_token)
        # The engine's seats: vLLM runs at most max_num_seqs at once and queues the rest inside
        # (where no deadline is watched). From the config (the operator sets it from the engine's
        # spec), else learned from the engine's metrics (running while requests wait).
        self._seats_config = sched.engine_max_num_seqs or INF_SEATS
        self._seats_seen: int | None = None
        self._last_snapshot: EngineSnapshot | None = None
        self._seats = self._seats_config
        # Slow start: until a completed request has run at a batch, the gate plans for at most
        # SLOW_START_FACTOR x the largest batch seen (the model there is still the prior's guess).
        self._batch_seen = 0.0
        self._confirmed = 0  # completed requests whose times were checked against the model
        self._model_error = INF  # their |log(observed / predicted)|, exponentially weighted
        self._cap = self._compute_cap()
        # Engine-seat integrals for learning: ∫ min(L, seats) dt, ∫ min(L, seats)^2 dt, and the
        # time the gate had something running (for the engine's step counters).
        self._Ae = 0.0
        self._A2 = 0.0
        self._busy = 0.0
        # (t, ∫L dt, ∫L^2 dt, prompt tokens admitted) at each event, for a request's decode span.
        self._log_t: list[float] = []
        self._log: list[tuple[float, float, float]] = []
        self._counters: tuple[float, float, float, float, float] | None = None
        self.classes = {c.name: c for c in config.classes}
        # Classes that state no output length: until they have learned one, their requests are
        # cold (`max_tokens` is only a bound). A reject class explores with at most
        # `output_min_samples` cold requests running at once (`_probes`): enough to learn its
        # lengths, and a bounded cost when the client's `max_tokens` is honest and cannot be met
        # (those probes finish at max_tokens, the class learns that, and the rest get the strict
        # reading at once). Read strictly from the start, a cap far above the real lengths
        # (an IDE sending 256 for ~13-token completions) would have it reject everything and
        # never learn a length.
        self._unsized = {c.name: c.output_tokens is None for c in config.classes}
        self._probe_limit = t.output_min_samples
        self._probes: dict[str, str] = {}  # id -> class of the cold reject-class requests running
        self._estimates = {
            c.name: OutputEstimate(t.output_window, p.output_quantile, t.output_min_samples) for c in config.classes
        }
        self.ttft_estimate = t.initial_ttft_seconds
        # Prompt tokens are the sidecar's estimate (characters / 4); the engine's model is in the
        # engine's tokens. `_ratio` (engine tokens per estimated token) is learned from `usage`
        # (finished(prompt_tokens=...)) or, without it, from the engine's prompt-token counter.
        self._ratio = 1.0
        self._usage_ratio_seen = False
        self._ratio_known = False
        self._usage_true = self._usage_est = 0.0
        self._counters_first: tuple[float, float] | None = None
        self._prefill = PlanPrefill(self.model.per_token)  # per_token and seconds(), on the hot paths
        self._P = 0.0  # prompt tokens admitted so far
        self._prefill_end = -INF  # when the engine is predicted to have prefilled every admitted prompt
        self._burst_at = -INF
        self._replays = REPLAYS_PER_DECISION
        self._resume_at: float | None = None  # a decision stopped at its work bound goes on then
        self._burst = 0
        self._cluster_tokens: dict[float, int] = {}
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
        # Best-effort admissions, exponentially weighted (for the best-effort wait bound).
        self._be_admits = 0.0
        self._be_t = 0.0
        self._be_since: float | None = None
        self._be_moved = 0.0  # when a request last left the best-effort queue (or it was empty)
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
        self,
        request_id: str,
        now: float,
        output_tokens: int,
        first_token_at: float | None,
        *,
        completed: bool = True,
        prompt_tokens: int | None = None,
    ) -> list[Action]:
        self._advance(now)
        self._version += 1
        run = self._running.pop(request_id, None)
        if run is None:
            return self._dispatch(now)
        if self._probes:
            self._probes.pop(request_id, None)
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
            self.ttft_estimate += TTFT_EWMA * (first_token_at - run.t0 - self.ttft_estimate)
        duration = now - run.t0
        # A request cut off (client gone, engine error) says nothing about its class's output
        # length or the engine's speed: learn only from complete ones (and not from one adopted
        # mid-flight at a reload, whose admission this instance did not see).
        if completed and output_tokens > 0 and duration > 0 and not run.adopted:
            concurrency = (self._A - run.a0) / duration
            if concurrency > self._batch_seen:
                self._batch_seen = concurrency
                cap = self._compute_cap()
                if cap != self._cap:
                    self._cap = cap
                    self._limit_table = None  # the fresh limit is capped by it
            if prompt_tokens is not None and prompt_tokens > 0 and run.req.prompt_tokens > 0:
                # The engine's count against the sidecar's estimate (characters / 4).
                # Token-weighted (sums, not a mean of ratios): short prompts carry a fixed few tokens
                # (BOS, template) that would skew it, and long prompts are what prefill costs.
                self._usage_ratio_seen = self._ratio_known = True
                self._usage_true = self._usage_true * (1 - RATIO_EWMA) + prompt_tokens
                self._usage_est = self._usage_est * (1 - RATIO_EWMA) + run.req.prompt_tokens
                self._set_ratio(self._usage_true / self._usage_est)
            learned = self._learn(run, now, output_tokens, first_token_at, prompt_tokens)
            est = self._estimates.get(run.req.sla_class)
            if (est is not None and est.add(output_tokens)) or learned:
                self._fresh_need = self._compute_fresh_need()
        return self._dispatch(now)

    def adopt(self, req: Request, now: float) -> None:
        """A running request from the instance this one replaces: priced as if admitted now with
        its whole expected length to go (its progress is unknown here: the cautious side), its
        prefill not charged again, protected by its deadline like any SLA request."""
        if req.id in self._queued or req.id in self._be_reqs or req.id in self._running:
            raise ValueError(f"request id {req.id!r} is already known to the policy")
        self._advance(now)
        est = self._estimates.get(req.sla_class)
        expected = est.value if est is not None and est.value is not None else req.expected_tokens
        expected = max(1, min(req.max_tokens, expected))
        tpot = 1.0 / req.tpot_target if req.tpot_target and not req.best_effort else 0.0
        admitted_at, prompt = req.admitted_at, req.prompt_tokens
        req.prompt_tokens = 0
        try:
            self._admit(req, expected, tpot, now, [], protect=req.deadline - self.margin > now)
        finally:
            req.admitted_at, req.prompt_tokens = admitted_at, prompt
        self._running[req.id].adopted = True

    def inherit(self, old: Policy) -> None:
        """The learned engine model (and what it rests on: seats, slow start) when the prior is the
        same, and each class's output-length estimate when the class is unchanged."""
        if not isinstance(old, SaberPolicy):
            return
        if old._prior_key == self._prior_key:
            self.model = old.model
            self._ratio, self._usage_ratio_seen, self._ratio_known = old._ratio, old._usage_ratio_seen, old._ratio_known
            self._sync_prefill()
            self._seats_seen, self._batch_seen = old._seats_seen, old._batch_seen
            self._confirmed, self._model_error = old._confirmed, old._model_error
            self._cap = self._compute_cap()
        for name, cls in self.classes.items():
            if old.classes.get(name) == cls and name in old._estimates:
                self._estimates[name] = old._estimates[name]
        self._fresh_need = self._compute_fresh_need()
        self._limit_table = None

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
        if snapshot.healthy:
            # Requests waiting inside the engine while it runs `running`: that is its seat limit
            # (vLLM's max_num_seqs, or fewer when its KV cache is full).
            # A request just handed over waits until the engine's next step, so one scrape with
            # waiting > 0 says nothing; two in a row with the same running count do.
            # Where the engine exports its counters, only an interval in which it ran steps and
            # prefilled nothing says so: a request also waits while another's long prompt takes
            # the step's whole token budget (a slow engine spends seconds in one such step), and
            # reading that as the seat limit held a CPU-like engine at 2 running.
            seen = self._seats_seen
            prev = self._last_snapshot
            if (snapshot.waiting > 0 and snapshot.running > 0 and prev is not None and prev.waiting > 0
                    and prev.running == snapshot.running and _seat_bound(prev, snapshot)):
                seen = snapshot.running
            elif seen is not None and snapshot.running > seen:
                seen = snapshot.running
            self._last_snapshot = snapshot
            if seen != self._seats_seen:
                self._seats_seen = seen
                self._cap = self._compute_cap()
                self._limit_table = None
            self._observe_counters(snapshot, now)
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
                "prompt_token_ratio": self._ratio,
                "planning_cap": float(min(self._cap, INF_SEATS)),
            },
            engine_speeds=self.model.speeds_at(),
            engine_prefill_seconds_per_token=self.model.per_token,
            engine_model_confidence=min(self.model.confidence, self.model.prefill_confidence),
            engine_model_observations=self.model.observations,
        )

    def expected_tokens(self, sla_class: str) -> int | None:
        """The class's current online output-length estimate, if it has one yet."""
        est = self._estimates.get(sla_class)
        return est.value if est is not None else None

    # -- learning the engine ------------------------------------------------------------------

    def _compute_cap(self) -> int:
        """The most requests the gate plans to run: the engine's seats, and while learning, the
        slow-start cap (SLOW_START_FACTOR x the largest batch completed requests ran at)."""
        seats = self._seats_config if self._seats_seen is None else min(self._seats_config, self._seats_seen)
        self._seats = seats
        if not self.model.online:
            return seats
        if self._confirmed >= SLOW_START_CONFIRM and self._model_error < SLOW_START_ERROR or (
            self._confirmed and self._model_error < SLOW_START_ERROR / 4
        ):
            return seats  # completed requests ran as the model predicted: it may be trusted
        slow = max(SLOW_START_MIN, math.ceil(SLOW_START_FACTOR * self._batch_seen))
        return min(seats, slow)

    def _check_prediction(self, predicted: float, observed: float) -> None:
        """Track how well the model predicted a completed request's times (before learning from it).

        Only the unsafe side counts: the slow-start cap guards against a model that is too
        optimistic (an engine slower than planned: admissions that miss). An engine that ran as
        fast or faster than predicted confirms the plan is safe; holding the cap there starves a
        fast engine (a GPU-class engine under the paper prior ran 81% where static caps ran 99%)."""
        if predicted > 0 and observed > 0:
            err = max(0.0, math.log(observed / predicted))
            self._model_error = err if not self._confirmed else self._model_error + ERROR_EWMA * (err - self._model_error)
            self._confirmed += 1

    def _state_at(self, t: float) -> tuple[float, float, float] | None:
        """(∫min(L, seats) dt, ∫min(L, seats)^2 dt, prompt tokens admitted) at time t, from the event log."""
        log_t = self._log_t
        i = bisect_right(log_t, t) - 1
        if i < 0:
            return None
        a = self._log[i]
        if i + 1 >= len(log_t):
            return a
        b = self._log[i + 1]
        f = (t - log_t[i]) / (log_t[i + 1] - log_t[i])
        return a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f, b[2]

    def _learn(self, run: _Run, now: float, output_tokens: int, first_token_at: float | None,
               prompt_tokens: int | None = None) -> bool:
        """Feed one completed request to the engine model; True when the model changed."""
        model = self.model
        if not model.online:
            return False
        seats = self._seats
        if run.n0 > seats:
            return False  # it waited inside the engine for a seat: its times are not engine work
        changed = False
        # Prompt tokens in the engine's units: the estimates scaled by the learned ratio, its own
        # prompt as the engine counted it when known.
        ratio = self._ratio
        own = run.req.prompt_tokens
        burst = round((run.burst - own) * ratio + (prompt_tokens if prompt_tokens else own * ratio))
        # A TTFT row needs its prompt tokens in the engine's units: with the engine's counters in
        # view, only once the estimate's error is known (usage, or enough counted tokens).
        ttft_ok = prompt_tokens is not None or self._ratio_known or self._counters_first is None
        # And only a prompt admitted alone (no other prompt within one step of it): in a cluster
        # the engine prefills in its own arrival order, not the gate's, so which prompts a
        # member's first token waited for is not known.
        ttft_ok = ttft_ok and run.burst == own
        if first_token_at is not None and run.t0 <= first_token_at <= now:
            if ttft_ok:
                changed = model.observe_ttft(run.n0, burst, first_token_at - run.t0)
            span = now - first_token_at
            at = self._state_at(first_token_at) if output_tokens >= 2 and span > 0 else None
            if at is not None:
                steps = output_tokens - 1
                mean_L = (self._Ae - at[0]) / span
                mean_L2 = (self._A2 - at[1]) / span
                # The prompts prefilled during the span: those admitted in it, and on average half
                # of those admitted in its own cluster after it (the engine prefills a cluster in
                # its own order: some of them after this request's first token).
                mates = self._cluster_tokens.get(run.cluster, run.burst) - run.burst
                p_span = self._P - at[2] + CLUSTER_SHARE * max(0, mates)
                per_step = p_span * ratio / steps
                self._check_prediction(model.step_seconds(mean_L, per_step), span / steps)
                if model.observe_decode(mean_L, mean_L2, per_step, span / steps):
                    changed = True
        else:
            at = self._state_at(run.t0)
            duration = now - run.t0
            if at is not None and duration > 0 and ttft_ok:
                mean_L = (self._Ae - at[0]) / duration
                mean_L2 = (self._A2 - at[1]) / duration
                span_prefill = (self._P - at[2] - run.burst) * ratio
                others = run.n0 - 1
                predicted = (model.step_seconds(others, burst) * (1.5 if others else 1.0)
                             + (output_tokens - 1) * model.step_seconds(mean_L, span_prefill / max(1, output_tokens - 1)))
                self._check_prediction(predicted, duration)
                changed = model.observe_request(run.n0, burst, mean_L, mean_L2, span_prefill,
                                                output_tokens, duration)
        cap = self._compute_cap()
        if cap != self._cap:
            self._cap = cap
            self._limit_table = None
        if changed:
            model.set_operating_point(max(1, self._limit))
            self._sync_prefill()
        return changed

    def _set_ratio(self, ratio: float) -> None:
        self._ratio = min(max(ratio, 0.05), 20.0)
        self._sync_prefill()

    def _sync_prefill(self) -> None:
        """The prefill cost the plan prices estimated prompt tokens at."""
        self._prefill.per_token = self.model.per_token * self._ratio

    def _observe_counters(self, snapshot: EngineSnapshot, now: float) -> None:
        """The engine's own step counters (vLLM's iteration histogram, token counters): over an
        interval in which the gate had requests running throughout, busy seconds per step at the
        mean decode batch and prefill per step: a direct observation of the step-time model."""
        if snapshot.steps is None or snapshot.prompt_tokens is None or snapshot.generation_tokens is None:
            return
        self._advance(now)
        if self._counters_first is None:
            self._counters_first = (snapshot.prompt_tokens, self._P)
        elif not self._usage_ratio_seen:
            # The gate is the engine's only client: prompt tokens the engine counted over those
            # the gate estimated, since the first scrape, are the estimate's error.
            # (Prompts admitted in the last two TTFTs may not be prefilled yet: not counted.)
            at = self._state_at(now - 2.0 * max(self.ttft_estimate, 0.01))
            d_engine = snapshot.prompt_tokens - self._counters_first[0]
            d_gate = (at[2] if at is not None else 0.0) - self._counters_first[1]
            if d_gate >= RATIO_MIN_TOKENS and d_engine > 0:
                self._set_ratio(d_engine / d_gate)
                self._ratio_known = True
        cur = (now, snapshot.steps, snapshot.prompt_tokens, snapshot.generation_tokens, self._busy)
        prev = self._counters
        if prev is None:
            self._counters = cur
            return
        dt = now - prev[0]
        dsteps, dprompt, dgen, dbusy = cur[1] - prev[1], cur[2] - prev[2], cur[3] - prev[3], cur[4] - prev[4]
        if dt > 0 and dbusy >= BUSY_SHARE * dt and dsteps >= 0 and (dt < COUNTER_SPAN_S or dsteps < COUNTER_MIN_STEPS):
            # Busy so far: the span grows (the engine publishes its counters in bursts), and until
            # it holds enough steps: on a slow engine one step prefilling a full token budget
            # takes seconds, and cutting spans at a fixed length left it no counter rows at all.
            return
        self._counters = cur
        if dt <= 0 or dsteps < COUNTER_MIN_STEPS or dprompt < 0 or dgen < 0 or dbusy < BUSY_SHARE * dt:
            return  # too few steps, a counter reset, or the engine idle part of the time
        L = max(1.0, dgen / dsteps)
        self._check_prediction(self.model.step_seconds(L, dprompt / dsteps), dbusy / dsteps)
        cap = self._compute_cap()
        if cap != self._cap:
            self._cap = cap
            self._limit_table = None
        if self.model.observe_steps(dsteps, dbusy, dgen, dprompt):
            self.model.set_operating_point(max(1, self._limit))
            self._sync_prefill()
            self._fresh_need = self._compute_fresh_need()

    # -- the running integrals (the rest of the batch model is in saber_replay.py) -------------

    def _advance(self, now: float) -> None:
        if self._t is None:
            self._t = now
            self._log_t.append(now)
            self._log.append((0.0, 0.0, 0.0))
            return
        dt = now - self._t
        if dt > 0:
            L = len(self._running)
            if L:
                table = self.model.table
                self._W += (table[L] if L < len(table) else self.model.speed(L)) * dt
                self._A += L * dt
                Le = L if L < self._seats else self._seats
                self._Ae += Le * dt
                self._A2 += Le * Le * dt
                self._busy += dt
            self._t = now
            log_t = self._log_t
            if len(log_t) >= LOG_MAX:
                del log_t[: LOG_MAX // 2], self._log[: LOG_MAX // 2]
            log_t.append(now)
            self._log.append((self._Ae, self._A2, self._P))
