"""Decisions for `SaberPolicy` (saber.py): which queued requests to admit now, and admitting them.

- Order: SLA requests wait in earliest-deadline-first order. When the head needs a lighter batch
  than now runs, up to `lookahead` requests behind it are tried, so one demanding request does not
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
  admissions may be possible it asks to be woken `min_recheck_seconds` later and goes on then.
- No deadlock: with nothing running, the head of the queue is admitted (or found hopeless and
  handled) unconditionally.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass
from typing import TYPE_CHECKING

from saber_sidecar.policy.base import Action, Admit, Request
from saber_sidecar.policy.saber_replay import FITS, HURTS_BATCH, INF, MISSES_OWN, _Plan

if TYPE_CHECKING:
    from saber_sidecar.policy.saber_state import _SaberState
else:
    _SaberState = object  # at run time the mixin's base is object, as before

REPLAYS_PER_DECISION = 1  # batch replays one decision may do; bounds its cost
CLUSTERS_KEPT = 4096  # prompt-token totals of recent clusters, for learning from decode spans


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
    adopted: bool = False  # taken over from another instance (a reload): its times teach nothing
    cluster: float = -1.0  # when its cluster (prompts admitted within one step of each other) began



class _AdmitMixin(_SaberState):
    """Part of `SaberPolicy`, which holds the state these methods read (see its `__init__`); a
    mixin rather than a helper object, so a decision stays method calls on one object."""

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
                if q.cold and q.req.on_miss == "reject":
                    self._probes[q.req.id] = q.req.sla_class
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
                probe = q.cold and q.req.on_miss == "reject"
                if probe and self._probing(q.req.sla_class) >= self._probe_limit:
                    i += 1  # enough of its class are exploring already: it waits for what they teach
                    continue
                if plan is None:
                    if self._replays <= 0:  # `_replay`, inlined
                        self._resume_at = now + self.min_recheck
                        return
                    self._replays -= 1
                    plan, stale = self._plan(now), False
                req = q.req
                verdict = fits(plan, q.expected, req.deadline, q.tpot_speed, req.prompt_tokens, 0.0, q.cold)
                if verdict is FITS and not self._ttft_fits(plan, req):
                    verdict = MISSES_OWN
                if verdict is FITS and stale:
                    plan, stale = self._replay(now), False
                    if plan is None:
                        return
                    verdict = fits(plan, q.expected, req.deadline, q.tpot_speed, req.prompt_tokens, 0.0, q.cold)
                    if verdict is FITS and not self._ttft_fits(plan, req):
                        verdict = MISSES_OWN
                if verdict is HURTS_BATCH:
                    hurt.add(shape)
                elif verdict is FITS:
                    del order[i]
                    del queued[req.id]
                    if probe:
                        self._probes[req.id] = req.sla_class
                    self._admit(req, q.expected, q.tpot_speed, now, out, protect=not self._thin)
                    stale = True
                    tried -= 1
                    break
                i += 1
            else:
                break  # the window was tried (or the queue ended) with no one leaving it
        if order:
            self._blocked_at = self._version

    def _prefill_seconds(self, prompt: int, L: int) -> float:
        """Engine time to prefill a prompt (estimated tokens) with L decoding: its tokens' cost and
        the decode part of the steps it is chunked over."""
        model = self.model
        tokens = prompt * self._ratio
        return self._prefill.seconds(prompt) + tokens / model.chunk * model.step_seconds(L if L > 0 else 1)

    def _prefill_ahead(self, now: float) -> float:
        """Seconds until the prompts admitted so far are predicted to be prefilled."""
        end = self._prefill_end
        return end - now if end > now else 0.0

    def _ttft_fits(self, plan: _Plan, req: Request) -> bool:
        """Whether a candidate admitted now would see its first token by its TTFT target: the
        prefill backlog ahead of it, its own prefill, and the model's fixed overhead."""
        ttft = req.ttft_deadline
        if ttft is None:
            return True
        first = plan.now + plan.ahead + self._prefill_seconds(req.prompt_tokens, plan.n) + self.model.ttft_overhead
        return first <= ttft - self.margin

    def _probing(self, sla_class: str) -> int:
        """Cold requests of a reject class running now (a handful at most)."""
        return sum(1 for c in self._probes.values() if c == sla_class)

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
            self._note_best_effort_admit(now)
            self._admit(q.req, q.expected, 0.0, now, out)

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
            run.cluster = self._burst_at  # the cluster's total so far is `_cluster_tokens[cluster]`
            self._cluster_tokens[self._burst_at] = self._burst
            if len(self._cluster_tokens) > CLUSTERS_KEPT:
                del self._cluster_tokens[next(iter(self._cluster_tokens))]
            # Its prefill holds up every running request (itself included) for a moment.
            self._P += req.prompt_tokens
            start = self._prefill_end if self._prefill_end > now else now
            self._prefill_end = start + self._prefill_seconds(req.prompt_tokens, len(running))
            self._W -= self.model.speed(len(self._running)) * self._prefill.seconds(req.prompt_tokens)
        if sla:
            self._sla_running += 1
        if run.tpot_speed:
            self._tpot_running += 1
        out.append(Admit(req.id, req.best_effort))
