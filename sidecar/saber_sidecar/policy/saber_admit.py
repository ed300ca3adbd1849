"""Decisions for `SaberPolicy` (saber.py): which queued requests to admit now, and admitting them.

- Order: SLA requests wait in earliest-deadline-first order. When the head needs a lighter batch
  than now runs, up to `Tuning.lookahead` requests behind it are tried, so one demanding request does not
  block the others.
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
  admissions may be possible it asks to be woken `Tuning.min_recheck_seconds` later and goes on then.
- No deadlock: with nothing running, the head of the queue is admitted (or found hopeless and
  handled) unconditionally.
"""

from __future__ import annotations

import heapq

from saber_sidecar.config import SaberSchedulingConfig
from saber_sidecar.policy.base import Action, Admit, Request
from saber_sidecar.policy.saber_batch import INF, Batch
from saber_sidecar.policy.saber_engine import EngineView
from saber_sidecar.policy.saber_load import Load
from saber_sidecar.policy.saber_queue import Queues
from saber_sidecar.policy.saber_replay import FITS, HURTS_BATCH, MISSES_OWN, FeasibilityCheck, Plan
from saber_sidecar.policy.saber_tuning import Tuning

REPLAYS_PER_DECISION = 1  # batch replays one decision may do; bounds its cost


class Admission:
    """Decides which queued requests to admit now, and admits them; owns what bounds a decision's
    work and what the last one found (the version of the state it saw the queue's front blocked at)."""

    def __init__(self, batch: Batch, engine: EngineView, load: Load, queues: Queues, check: FeasibilityCheck,
                 p: SaberSchedulingConfig, t: Tuning) -> None:
        self.batch = batch
        self.engine = engine
        self.load = load
        self.queues = queues
        self.check = check
        self.margin = p.deadline_margin_seconds
        self.reserve = p.best_effort_reserve
        self.kv_high = p.kv_cache_high
        self.headroom = 1.0 + t.speed_headroom
        self.lookahead = t.lookahead
        self.min_recheck = t.min_recheck_seconds
        # A class that states no output length explores with at most this many cold requests
        # running at once (`probes`: id -> class): enough to learn its lengths. For a demote
        # class the bound keeps a burst from flooding the engine with requests of unknown length
        # (unprotected, they hold no admission back); for a reject class it bounds the cost when
        # the client's `max_tokens` is honest and cannot be met (those probes finish at
        # max_tokens, the class learns that, and the rest get the strict reading at once). Read
        # strictly from the start, a cap far above the real lengths (an IDE sending 256 for
        # ~13-token completions) would have it reject everything and never learn a length.
        # Best effort waits while any probe runs: a probe is unprotected for want of a length,
        # not because its deadline does not matter.
        self.probe_limit = t.output_min_samples
        self.probes: dict[str, str] = {}
        self.replays = REPLAYS_PER_DECISION
        self.resume_at: float | None = None  # a decision stopped at its work bound goes on then
        self.version = 0  # bumped whenever the batch, the queue's front or an estimate changes
        self.blocked_at = -1  # the version at which the queue's front was last found blocked

    def dispatch(self, now: float) -> list[Action]:
        out: list[Action] = []
        self.replays = REPLAYS_PER_DECISION
        if self.resume_at is not None and now >= self.resume_at:
            self.resume_at = None
        # The timer and wait-bound handlers are entered only when one is due (or, for the wait
        # bound, when its heaps are to be cleared): most decisions have none, and the call costs
        # more than the test.
        queues = self.queues
        timers = queues.timers
        if timers and timers[0][0] <= now:
            queues.fire_timers(now, out)
        expiry = queues.be_expiry
        if expiry and (expiry[0][0] <= now or not queues.be_reqs):
            queues.expire_best_effort(now, out)
        if queues.order:
            self.admit_sla(now, out)
        if queues.be:
            self.admit_best_effort(now, out)
        return out

    def replay(self, now: float) -> Plan | None:
        """A fresh plan, or None when this decision has used its replays (it resumes shortly)."""
        if self.replays <= 0:
            self.resume_at = now + self.min_recheck
            return None
        self.replays -= 1
        return self.check.plan(now)

    def admit_sla(self, now: float, out: list[Action]) -> None:
        """EDF: admit the head while it fits; past a head that does not, try up to `lookahead` more.

        One scan of the window, with bounded work. Admitting only ever grows the batch, so a
        candidate that failed against the batch before an admission fails after it too; the
        batch is replayed (`FeasibilityCheck.plan`) only for a candidate that passed against an
        outdated plan, and at most `REPLAYS_PER_DECISION` times: past that the decision stops and
        asks to be woken `min_recheck` later to go on. A candidate that would push a running
        request late rules out every later one with the same length and prompt (their slack
        reserve is no smaller), so each (length, prompt) is priced once per scan.
        """
        queues = self.queues
        order = queues.order
        queued = queues.queued
        running = self.batch.running
        probes = self.probes
        # An empty engine takes the head unconditionally (no deadlock), unless it is hopeless.
        while not running and order:
            q = order[0][3]
            reason = queues.hopeless(q, now)
            del order[0]
            del queued[q.req.id]
            if reason:
                queues.miss(q, now, reason, out)
            else:
                if q.cold:
                    probes[q.req.id] = q.req.sla_class
                self.admit(q.req, q.expected, q.tpot_speed, now, out, protect=not q.cold)
        if not order:
            return
        lookahead = self.lookahead
        check = self.check
        fits = check.fits
        plan: Plan | None = None
        stale = True
        thin = False
        hurt: set[tuple[int, int]] = set()
        # Queued requests that became hopeless were handled by their timers, which fire first
        # in every decision, but the load may have grown since (`shed_speed`); `fits` checks
        # each deadline against the batch. (The speed each needs is worked out inline: this loop
        # runs for the whole window.)
        shed_v = queues.shed_speed()
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
                    queues.warm_up(q)
                slack = q.due - now
                if slack <= 0.0 or (not q.cold and (q.expected / slack > shed_v or q.tpot_speed > shed_v)):
                    del order[i]
                    del queued[q.req.id]
                    queues.miss(q, now, "deadline needs a batch too small for the load", out)
                    break
                tried += 1
                shape = q.shape
                if hurt and shape in hurt:
                    i += 1
                    continue
                probe = q.cold  # (warmed up above if its class has learned a length meanwhile)
                if probe and self.probing(q.req.sla_class) >= self.probe_limit:
                    i += 1  # enough of its class are exploring already: it waits for what they teach
                    continue
                if plan is None:
                    if self.replays <= 0:  # `replay`, inlined
                        self.resume_at = now + self.min_recheck
                        return
                    self.replays -= 1
                    plan, stale = check.plan(now), False
                req = q.req
                verdict, thin = fits(plan, q.expected, req.deadline, q.tpot_speed, req.prompt_tokens, 0.0, q.cold)
                if verdict is FITS and not self.ttft_fits(plan, req):
                    verdict = MISSES_OWN
                if verdict is FITS and stale:
                    plan, stale = self.replay(now), False
                    if plan is None:
                        return
                    verdict, thin = fits(plan, q.expected, req.deadline, q.tpot_speed, req.prompt_tokens, 0.0, q.cold)
                    if verdict is FITS and not self.ttft_fits(plan, req):
                        verdict = MISSES_OWN
                if verdict is HURTS_BATCH:
                    hurt.add(shape)
                elif verdict is FITS:
                    del order[i]
                    del queued[req.id]
                    if probe:
                        probes[req.id] = req.sla_class
                    self.admit(req, q.expected, q.tpot_speed, now, out, protect=not thin)
                    stale = True
                    tried -= 1
                    break
                i += 1
            else:
                break  # the window was tried (or the queue ended) with no one leaving it
        if order:
            self.blocked_at = self.version

    def ttft_fits(self, plan: Plan, req: Request) -> bool:
        """Whether a candidate admitted now would see its first token by its TTFT target: the
        prefill backlog ahead of it, its own prefill, and the model's fixed overhead."""
        ttft = req.ttft_deadline
        if ttft is None:
            return True
        engine = self.engine
        first = plan.now + plan.ahead + engine.prefill_seconds(req.prompt_tokens, plan.n) + engine.model.ttft_overhead
        return first <= ttft - self.margin

    def probing(self, sla_class: str) -> int:
        """Cold requests of a class running now (a handful at most)."""
        return sum(1 for c in self.probes.values() if c == sla_class)

    def admit_best_effort(self, now: float, out: list[Action]) -> None:
        """Shortest weighted job first, and only while a fresh SLA arrival would still find room
        (see the module docstring)."""
        queues = self.queues
        be = queues.be
        be_reqs = queues.be_reqs
        running = self.batch.running
        table = self.engine.model.table
        while be:
            rid = be[0][2]
            q = be_reqs.get(rid)
            if q is None:
                heapq.heappop(be)
                continue
            L = len(running)
            if L:
                if self.engine.kv_usage >= self.kv_high or self.probes:
                    return
                slot = L + 1 + self.reserve
                if slot >= len(table) or table[slot] < self.load.fresh_need * self.headroom:
                    return
                plan = self.replay(now)
                span = q.req.deadline - q.req.arrival
                if plan is None or self.check.fits(plan, q.expected, None, 0.0, q.req.prompt_tokens, span)[0] is not FITS:
                    return
            heapq.heappop(be)
            del be_reqs[rid]
            queues.note_best_effort_admit(now)
            self.admit(q.req, q.expected, 0.0, now, out)

    def admit(
        self, req: Request, expected: int, tpot_speed: float, now: float, out: list[Action], protect: bool = True
    ) -> None:
        req.admitted_at = now
        self.version += 1
        due = req.deadline - self.margin if not req.best_effort and protect else INF
        self.batch.add(req, expected, tpot_speed, due, now, self.engine)
        out.append(Admit(req.id, req.best_effort))
