"""`saber`: our event-driven, deadline-aware admission policy.

Decisions happen when a request arrives, when one finishes, and on timers the policy asks for
(`next_wake`); there is no polling tick. This module holds `SaberPolicy`, a thin coordinator: the
driver's entry points, which hand each event to the parts it concerns. Each part owns its state
and its parameters, one module each, and holds the other parts it reads:

- `saber_batch.py`: `Batch`, the running requests (sorted by predicted finish) and their integrals.
- `saber_engine.py`: `EngineView`, the engine model, its seats and slow-start cap, and learning it.
- `saber_load.py`: `Load`, the offered load, and the largest batch a fresh request fits in.
- `saber_replay.py`: `FeasibilityCheck`, the batch replay and the admission test (a `Fit`).
- `saber_queue.py`: `Queues`, EDF and best effort, hopeless timers, demotion, rejection, Retry-After.
- `saber_admit.py`: `Admission`, the decisions: earliest deadline first with lookahead, best effort.
- `saber_tuning.py`: `Tuning`, the internal constants the parts are built with.

Where it goes past the paper's Algorithm 1 (more in those modules' docstrings):

- Output length: each request is expected to produce the `output_quantile` (p90) of its class's
  recent output lengths once `Tuning.output_min_samples` have finished (the class's `output_tokens`, or
  `max_tokens`, before that), capped by its `max_tokens`; the paper assumes `max_tokens`.
- Cold start: a request of a demote class that states no `output_tokens` and has learned none
  yet is cold: its `max_tokens` is only a bound (HumanEval: 384 against a median of ~48). It is
  not shed or demoted for that length; it is admitted, unprotected, as soon as it pushes no
  running request late when priced at `max_tokens` (the cautious side for the others) and leaves
  the room best effort leaves for fresh requests; it is demoted only when its deadline passes.
  Protecting it at `max_tokens` would hold every later admission back until it ends. Once its
  class has an estimate, a still-queued cold request takes it. At most `Tuning.output_min_samples`
  cold requests of a class run at once, and best effort waits while any does: admitted freely
  under a burst, cold requests flooded the engine before any length was known (the code trace
  at 3x capacity: 36 of its first 40 admitted, each decoding at ~10 tok/s behind the others'
  prefills). For a reject class the bound also means an honest `max_tokens` that cannot be met
  costs a few probes and then gets the strict reading.
- The class's estimate counts its running requests at their planned progress while they are past
  the finished lengths' quantile: the shortest requests finish first (estimates.py).
- The engine: planned with `EngineModel` (engine_model.py), step time t0 + t1 L + t2 L^2 + c P
  learned online from completed requests' decode spans and times to first token and from the
  engine's step counters, starting from the configured prior (`engine_profile`, else the speed
  curve and the built-in prefill cost). Every admission makes the engine prefill the new
  prompt, which stalls every running request for `prompt_tokens x c` seconds: charged to the batch
  at admission (W steps back) and priced in `FeasibilityCheck.fits`. Prompt tokens are the sidecar's estimate,
  scaled to the engine's count by a learned ratio (usage, else the engine's prompt counter).
- Safe until learned: a slow-start cap on running (8, then 2x the largest batch completed
  requests ran at, or a first token came as fast as planned at: `first_token`) until
  observations confirm the model, and never more running than the
  engine's seats (`engine_max_num_seqs`, or what its running/waiting metrics show).
- Cut-off requests (`finished(..., completed=False)`) free their slot but feed neither the
  output-length estimates nor the speed model.
"""

from __future__ import annotations

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
from saber_sidecar.policy.saber_admit import Admission
from saber_sidecar.policy.saber_batch import INF, Batch
from saber_sidecar.policy.saber_engine import INF_SEATS, EngineView
from saber_sidecar.policy.saber_load import Load
from saber_sidecar.policy.saber_queue import Queued, Queues
from saber_sidecar.policy.saber_replay import FITS, HURTS_BATCH, MISSES_OWN, FeasibilityCheck, Fit, Verdict
from saber_sidecar.policy.saber_tuning import DEFAULT_TUNING, Tuning

__all__ = ["FITS", "HURTS_BATCH", "INF", "INF_SEATS", "MISSES_OWN", "Fit", "SaberPolicy", "Verdict"]


class SaberPolicy(Policy):
    name = "saber"

    def __init__(self, config: SidecarConfig, tuning: Tuning = DEFAULT_TUNING, model: EngineModel | None = None) -> None:
        """`tuning`: the internal constants (saber_tuning.py), varied by tests and benchmarks only;
        `model`: an engine model to start from instead of the one the config's prior gives."""
        sched = config.scheduling
        p = sched.saber
        t = tuning
        self.margin = p.deadline_margin_seconds
        self.max_queue = sched.max_queue
        self.classes = {c.name: c for c in config.classes}
        # Classes that state no output length: until they have learned one, their requests are
        # cold (`max_tokens` is only a bound; see the module docstring).
        self._unsized = {c.name: c.output_tokens is None for c in config.classes}
        self.estimates = {
            c.name: OutputEstimate(t.output_window, p.output_quantile, t.output_min_samples) for c in config.classes
        }
        model = engine_model_for(sched) if model is None else model
        # What the engine model's prior rests on: a reload that keeps it keeps what was learned.
        self._prior_key = (sched.speed_model, sched.engine_profile, model.per_token)
        self.batch = Batch()
        self.engine = EngineView(model, self.batch, sched.engine_max_num_seqs, t.initial_ttft_seconds)
        self.load = Load(self.engine, self.classes, self.estimates, p, t)
        self.queues = Queues(self.batch, self.engine, self.load, self.estimates, p, t)
        self.check = FeasibilityCheck(self.batch, self.engine, self.load, p, t)
        self.admission = Admission(self.batch, self.engine, self.load, self.queues, self.check, p, t)

    @property
    def model(self) -> EngineModel:
        """The engine model (owned by `engine`; not on the hot paths)."""
        return self.engine.model

    # -- driver calls -------------------------------------------------------------------------

    def submit(self, req: Request, now: float) -> list[Action]:
        queues = self.queues
        batch = self.batch
        if req.id in queues.queued or req.id in queues.be_reqs or req.id in batch.running:
            raise ValueError(f"request id {req.id!r} is already known to the policy")
        engine = self.engine
        batch.advance(now, engine.model, engine.seats)
        if len(queues.queued) + len(queues.be_reqs) >= self.max_queue:
            return [Reject(req.id, QUEUE_FULL, retry_after_s=queues.retry_after(now))]
        queues.seq += 1
        est = self.estimates.get(req.sla_class)
        learned = None if est is None or req.exact_length else est.value
        expected = learned if learned is not None else req.expected_tokens
        cold = (learned is None and not req.exact_length and expected >= req.max_tokens
                and self._unsized.get(req.sla_class, False))
        expected = max(1, min(req.max_tokens, expected))
        self.load.note_arrival(expected, now)
        q = Queued(
            req,
            expected,
            (req.deadline, queues.seq, req.id),
            1.0 / req.tpot_target if req.tpot_target else 0.0,
            req.deadline - self.margin,
            (expected, req.prompt_tokens),
            cold,
        )
        out: list[Action] = []
        reason = queues.hopeless(q, now)
        at = -1  # its place in the EDF order, once queued
        if reason:
            queues.miss(q, now, reason, out)
        else:
            at = queues.enqueue(q, now)
        admission = self.admission
        if admission.blocked_at == admission.version and at > admission.lookahead:
            # Nothing has changed since the last decision found the queue's front blocked, and
            # this request queues behind the whole window that decision tried: it cannot change
            # the outcome, so skip replaying the batch (this keeps arrivals cheap when the queue
            # is long).
            queues.fire_timers(now, out)
        else:
            out.extend(admission.dispatch(now))
        if req.id in queues.queued and req.on_miss == "reject":
            queues.reject_if_late(q, now, out)
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
        batch = self.batch
        engine = self.engine
        admission = self.admission
        batch.advance(now, engine.model, engine.seats)
        admission.version += 1
        run = batch.remove(request_id)
        if run is None:
            return admission.dispatch(now)
        if admission.probes:
            admission.probes.pop(request_id, None)
        engine.note_prefilled(run, now, first_token_at)  # when its prompt was prefilled, for learning
        if first_token_at is not None and first_token_at >= run.t0:
            engine.note_ttft(first_token_at - run.t0)
        duration = now - run.t0
        # A request cut off (client gone, engine error) says nothing about its class's output
        # length or the engine's speed: learn only from complete ones (and not from one adopted
        # mid-flight at a reload, whose admission this instance did not see).
        if completed and output_tokens > 0 and duration > 0 and not run.adopted:
            load = self.load
            if engine.note_concurrency((batch.A - run.a0) / duration):
                load.invalidate()
            if prompt_tokens is not None and prompt_tokens > 0 and run.req.prompt_tokens > 0:
                engine.note_usage(prompt_tokens, run.req.prompt_tokens)
            learned, cap_changed = engine.learn(run, now, output_tokens, first_token_at, prompt_tokens, load.limit)
            if cap_changed:
                load.invalidate()
            batch.note_realised(run, output_tokens)
            est = self.estimates.get(run.req.sla_class)
            # the class's running requests are censored samples of its lengths (estimates.py)
            if (est is not None and est.add(output_tokens, batch, run.req.sla_class)) or learned:
                load.fresh_need = load.compute_fresh_need()
        return admission.dispatch(now)

    def first_token(self, request_id: str, now: float) -> list[Action]:
        """A first token as fast as planned grows the slow-start cap (`EngineView.note_first_token`)."""
        run = self.batch.running.get(request_id)
        engine = self.engine
        if run is None or not engine.note_first_token(run, now):
            return []
        self.load.invalidate()
        self.batch.advance(now, engine.model, engine.seats)
        self.admission.version += 1
        return self.admission.dispatch(now)

    def adopt(self, req: Request, now: float) -> None:
        """A running request from the instance this one replaces: priced as if admitted now with
        its whole expected length to go (its progress is unknown here: the cautious side), its
        prefill not charged again, protected by its deadline like any SLA request."""
        if req.id in self.queues or req.id in self.batch.running:
            raise ValueError(f"request id {req.id!r} is already known to the policy")
        self.batch.advance(now, self.engine.model, self.engine.seats)
        est = self.estimates.get(req.sla_class)
        learned = None if est is None or req.exact_length else est.value
        expected = learned if learned is not None else req.expected_tokens
        expected = max(1, min(req.max_tokens, expected))
        tpot = 1.0 / req.tpot_target if req.tpot_target and not req.best_effort else 0.0
        admitted_at, prompt = req.admitted_at, req.prompt_tokens
        req.prompt_tokens = 0
        try:
            self.admission.admit(req, expected, tpot, now, [], protect=req.deadline - self.margin > now)
        finally:
            req.admitted_at, req.prompt_tokens = admitted_at, prompt
        self.batch.running[req.id].adopted = True

    def inherit(self, old: Policy) -> None:
        """The learned engine model (and what it rests on: seats, slow start) when the prior is the
        same, and each class's output-length estimate when the class is unchanged."""
        if not isinstance(old, SaberPolicy):
            return
        if old._prior_key == self._prior_key:
            self.engine.adopt(old.engine)
        for name, cls in self.classes.items():
            if old.classes.get(name) == cls and name in old.estimates:
                self.estimates[name] = old.estimates[name]
        self.load.fresh_need = self.load.compute_fresh_need()
        self.load.invalidate()

    def cancel(self, request_id: str, now: float) -> list[Action]:
        i = self.queues.cancel(request_id)
        if i is not None and i <= self.admission.lookahead:
            self.admission.version += 1  # the window the last decision tried has changed
        return []

    def wake(self, now: float) -> list[Action]:
        self.batch.advance(now, self.engine.model, self.engine.seats)
        return self.admission.dispatch(now)

    def next_wake(self) -> float | None:
        first = self.queues.next_wake()
        resume = self.admission.resume_at
        if resume is not None and (first is None or resume < first):
            return resume
        return first

    def observe_engine(self, snapshot: EngineSnapshot, now: float) -> list[Action]:
        engine = self.engine
        kv_high = self.admission.kv_high
        was_high = engine.kv_usage >= kv_high
        self.admission.version += 1
        engine.kv_usage = snapshot.kv_cache_usage
        if snapshot.healthy:
            load = self.load
            if engine.observe_seats(snapshot):
                load.invalidate()
            learned, cap_changed = engine.observe_counters(snapshot, now, load.limit)
            if cap_changed:
                load.invalidate()
            if learned:
                load.fresh_need = load.compute_fresh_need()
        if was_high and engine.kv_usage < kv_high and self.queues.be:
            self.batch.advance(now, engine.model, engine.seats)
            return self.admission.dispatch(now)
        return []

    def stats(self) -> PolicyStats:
        L = len(self.batch.running)
        model = self.engine.model
        t = self.batch.t
        return PolicyStats(
            queued_sla=len(self.queues.queued),
            queued_best_effort=len(self.queues.be_reqs),
            running=L,
            admission_limit=self.load.fresh_limit(),
            predicted_speed=model.speed(L + 1),
            speed_model_r2=model.r2,
            speed_model_error_ratio=model.error_ratio,
            extra={
                "ttft_estimate_seconds": self.engine.ttft_estimate,
                "speed_model_refits": float(model.refits),
                "sla_running": float(self.batch.sla_running),
                "offered_load_ratio": self.load.offered_ratio(t) if t is not None else 0.0,
                "prefill_seconds_per_token": self.engine.per_token,
                "prompt_token_ratio": self.engine.ratio,
                "planning_cap": float(min(self.engine.cap, INF_SEATS)),
            },
            engine_speeds=model.speeds_at(),
            engine_prefill_seconds_per_token=model.per_token,
            engine_model_confidence=min(model.confidence, model.prefill_confidence),
            engine_model_observations=model.observations,
        )

    def expected_tokens(self, sla_class: str) -> int | None:
        """The class's current online output-length estimate, if it has one yet."""
        est = self.estimates.get(sla_class)
        return est.value if est is not None else None
