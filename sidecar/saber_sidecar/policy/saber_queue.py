"""The queues of `SaberPolicy` (saber.py): queued SLA requests in EDF order, best effort, the
timers at which queued requests become hopeless; demotion and rejection, the best-effort wait
bound (see saber_admit.py), and the Retry-After estimate.

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
  waiting. `on_miss: demote` requests become best effort, as in the paper, with a bounded wait:
  a demoted request is rejected (429) at once when the best-effort queue ahead of it is not
  predicted to drain within `best_effort_max_wait_slas` x its SLA of its arrival (at the rate best
  effort has been admitted recently), and in any case when that bound is reached.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from saber_sidecar.config import SaberSchedulingConfig
from saber_sidecar.policy.base import Action, Demote, Reject, Request
from saber_sidecar.policy.estimates import OutputEstimate
from saber_sidecar.policy.saber_batch import INF, Batch
from saber_sidecar.policy.saber_engine import EngineView
from saber_sidecar.policy.saber_load import Load
from saber_sidecar.policy.saber_tuning import Tuning

BE_STUCK_SHARE = 0.25


@dataclass(slots=True)
class Queued:
    req: Request
    expected: int
    key: tuple[float, int, str]  # position in the EDF order
    tpot_speed: float
    due: float  # deadline less the margin: copied out of `req` for the decision's inner loop
    shape: tuple[int, int]  # (expected tokens, prompt tokens): candidates priced alike
    # Its class states no output length and has not learned one yet: `expected` is only
    # `max_tokens`, an upper bound.
    cold: bool = False
    timer: int = 0  # generation of this request's current timer; older timers are stale


class Queues:
    """The queued requests and everything that takes them out of the queue other than admission."""

    def __init__(self, batch: Batch, engine: EngineView, load: Load, estimates: dict[str, OutputEstimate],
                 p: SaberSchedulingConfig, t: Tuning) -> None:
        self.batch = batch
        self.engine = engine
        self.load = load
        self.estimates = estimates
        self.margin = p.deadline_margin_seconds
        self.shed = p.shed_batch_fraction
        self.be_wait = p.best_effort_max_wait_slas
        self.headroom = 1.0 + t.speed_headroom
        self.min_recheck = t.min_recheck_seconds
        self.tau = t.load_window_seconds
        self.queued: dict[str, Queued] = {}
        # Queued SLA requests, EDF: (deadline, seq, id, the Queued). `q.key` (the first three)
        # bisects to a request's entry; seq is unique, so the Queued is never compared.
        self.order: list[tuple[float, int, str, Queued]] = []
        self.timers: list[tuple[float, int, str, int]] = []  # (when, seq, id, timer generation)
        # Best effort, shortest weighted job first: (expected tokens x SLA seconds, seq, id).
        self.be: list[tuple[float, int, str]] = []
        self.be_reqs: dict[str, Queued] = {}
        # (when its wait runs out, seq, id) of best-effort requests, for the wait bound.
        self.be_expiry: list[tuple[float, int, str]] = []
        self.seq = 0
        # Best-effort admissions, exponentially weighted (for the best-effort wait bound).
        self.be_admits = 0.0
        self.be_t = 0.0
        self.be_since: float | None = None
        self.be_moved = 0.0  # when a request last left the best-effort queue (or it was empty)

    def __len__(self) -> int:
        return len(self.queued) + len(self.be_reqs)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.queued or request_id in self.be_reqs

    def enqueue(self, q: Queued, now: float) -> int:
        """Queue an SLA request in EDF order, with its timer; its place in the order."""
        self.queued[q.req.id] = q
        entry = (*q.key, q)
        at = bisect_right(self.order, entry)
        self.order.insert(at, entry)
        self.set_timer(q, now)
        return at

    def cancel(self, request_id: str) -> int | None:
        """Drop a queued request (SLA or best effort); its place in the EDF order, if it had one."""
        q = self.queued.pop(request_id, None)
        if q is not None:
            i = bisect_left(self.order, q.key)
            del self.order[i]
            return i
        if self.be_reqs.pop(request_id, None) is not None and not self.be_reqs:
            self.be.clear()
            self.be_expiry.clear()
        return None

    def next_wake(self) -> float | None:
        """The earliest live timer or best-effort wait bound (stale entries are dropped)."""
        timers = self.timers
        while timers:
            when, _, rid, gen = timers[0]
            q = self.queued.get(rid)
            if q is not None and q.timer == gen:
                break
            heapq.heappop(timers)
        first = timers[0][0] if timers else None
        expiry = self.be_expiry
        while expiry and expiry[0][2] not in self.be_reqs:
            heapq.heappop(expiry)
        if expiry and (first is None or expiry[0][0] < first):
            first = expiry[0][0]
        return first

    def shed_speed(self) -> float:
        """The most speed a queued request may still need and be kept waiting for.

        A request admitted late needs a fast, hence small, batch until it is done, and every
        admission after it must keep it on time: under contention one such request throttles the
        engine for everyone. So while `contenders` SLA requests are queued or running, a request
        that would need more than v(shed_batch_fraction x min(contenders, fresh limit)) is shed
        (demoted or rejected) rather than admitted; with nothing else around, the floor is one
        request alone on the engine, as in the paper.
        """
        table = self.engine.model.table
        if self.shed <= 0.0:
            return table[1]
        contenders = len(self.queued) + self.batch.sla_running
        load = self.load
        if load.limit_table is table and load.limit_need == load.fresh_need:
            limit = load.limit
        else:
            limit = load.fresh_limit_cached()
        floor = int(self.shed * (contenders if contenders < limit else limit))
        return table[floor] if floor > 1 else table[1]

    def hopeless(self, q: Queued, now: float) -> str | None:
        if q.due <= now:
            return "deadline cannot be met"
        if q.cold and not self.warm_up(q):
            ttft = q.req.ttft_deadline
            if ttft is not None and now + self.engine.ttft_estimate > ttft - self.margin:
                return "time-to-first-token target cannot be met"
            return None
        # The speed it needs: its tokens over the time left (ahead here), or its TPOT speed if higher.
        need = q.expected / (q.due - now)
        if need <= q.tpot_speed:
            need = q.tpot_speed
        if need > self.engine.model.table[1]:
            return "deadline needs more than the engine's single-request speed"
        if need > self.shed_speed():
            return "deadline needs a batch too small for the load"
        ttft = q.req.ttft_deadline
        if ttft is not None and now + self.engine.ttft_estimate > ttft - self.margin:
            return "time-to-first-token target cannot be met"
        return None

    def hopeless_at(self, q: Queued) -> float:
        t = q.due if q.cold else q.due - q.expected / self.shed_speed()
        if q.tpot_speed > self.engine.model.table[1]:
            t = -INF
        if q.req.ttft_deadline is not None:
            t = min(t, q.req.ttft_deadline - self.margin - self.engine.ttft_estimate)
        return t

    def warm_up(self, q: Queued) -> bool:
        """A cold request whose class has learned its output length since it queued takes that estimate."""
        value = self.estimates[q.req.sla_class].value
        if value is None:
            return False
        q.expected = max(1, min(q.req.max_tokens, value))
        q.shape = (q.expected, q.req.prompt_tokens)
        q.cold = False
        return True

    def set_timer(self, q: Queued, now: float, when: float | None = None) -> None:
        q.timer += 1
        at = self.hopeless_at(q) if when is None else when
        heapq.heappush(self.timers, (max(at, now), q.key[1], q.req.id, q.timer))

    def fire_timers(self, now: float, out: list[Action]) -> None:
        timers = self.timers
        while timers and timers[0][0] <= now:
            _, _, rid, gen = heapq.heappop(timers)
            q = self.queued.get(rid)
            if q is None or q.timer != gen:
                continue
            reason = self.hopeless(q, now)
            if not reason and now >= self.hopeless_at(q) - 1e-9:
                # Its last chance has come and it is still queued: by the next event it is late.
                reason = "deadline cannot be met"
                if q.req.ttft_deadline is not None and now >= q.req.ttft_deadline - self.margin - self.engine.ttft_estimate - 1e-9:
                    reason = "time-to-first-token target cannot be met"
            if reason:
                self.dequeue(q)
                self.miss(q, now, reason, out)
            elif q.req.on_miss == "reject":
                self.reject_if_late(q, now, out)
            else:
                self.set_timer(q, now, max(self.hopeless_at(q), now + self.min_recheck))

    def expire_best_effort(self, now: float, out: list[Action]) -> None:
        """Reject best-effort requests that have waited `best_effort_max_wait_slas` SLAs: a bounded wait."""
        expiry = self.be_expiry
        while expiry and expiry[0][0] <= now:
            _, _, rid = heapq.heappop(expiry)
            if self.be_reqs.pop(rid, None) is not None:
                out.append(Reject(rid, "best-effort wait bound reached", retry_after_s=self.retry_after(now)))
        if not self.be_reqs:
            self.be.clear()

    def dequeue(self, q: Queued) -> None:
        del self.queued[q.req.id]
        del self.order[bisect_left(self.order, q.key)]

    def miss(self, q: Queued, now: float, reason: str, out: list[Action]) -> None:
        req = q.req
        if req.on_miss == "reject":
            out.append(Reject(req.id, reason, retry_after_s=self.retry_after(now)))
            return
        if self.be_wait > 0.0:
            expiry = req.arrival + self.be_wait * (req.deadline - req.arrival)
            if not self.best_effort_has_room(expiry - now, now):
                # Best effort is backed up past its wait bound: say so now, not at the bound.
                out.append(Reject(req.id, f"{reason}; best effort is backed up beyond the wait bound",
                                  retry_after_s=self.retry_after(now)))
                return
        req.best_effort = True
        heapq.heappush(self.be, (q.expected * (req.deadline - req.arrival), q.key[1], req.id))
        self.be_reqs[req.id] = q
        if self.be_wait > 0.0:
            heapq.heappush(self.be_expiry, (max(expiry, now), q.key[1], req.id))
        out.append(Demote(req.id, reason))

    def best_effort_has_room(self, wait: float, now: float) -> bool:
        """Whether a request joining the best-effort queue now is predicted to be admitted within
        `wait` seconds: the requests already queued there, at the rate best effort has been
        admitted recently (over `Tuning.load_window_seconds`). Before any best-effort admission has been
        seen, up to one batch (the fresh limit) may queue."""
        ahead = len(self.be_reqs)
        if not ahead:
            self.be_moved = now
            return wait > 0.0
        if now - self.be_moved > BE_STUCK_SHARE * wait:
            return False  # nothing has left the best-effort queue for a good part of the bound
        rate = self.be_rate(now)
        return rate <= 0.0 or ahead / rate <= wait

    def be_rate(self, now: float) -> float:
        """Best-effort admissions per second, exponentially weighted over `Tuning.load_window_seconds`."""
        if self.be_since is None:
            return 0.0
        tau = self.tau
        span = max(now - self.be_since, 0.1 * tau)
        weight = tau * (1.0 - math.exp(-span / tau))
        return self.be_admits * math.exp(-max(0.0, now - self.be_t) / tau) / weight

    def note_best_effort_admit(self, now: float) -> None:
        if self.be_since is None:
            self.be_since = now
        dt = now - self.be_t
        if dt > 0:
            self.be_admits *= math.exp(-dt / self.tau)
            self.be_t = now
        self.be_admits += 1.0
        self.be_moved = now

    def reject_if_late(self, q: Queued, now: float, out: list[Action]) -> None:
        """For reject classes: reject now if the request is predicted not to get in in time."""
        if q.cold and not self.warm_up(q):
            self.set_timer(q, now)  # its length is unknown: it waits for its chance until its deadline
            return
        eta = self.admission_eta(q, now)
        if eta is None:
            self.dequeue(q)
            out.append(Reject(q.req.id, "predicted to miss its deadline", retry_after_s=self.retry_after(now)))
            return
        hopeless = self.hopeless_at(q)
        when = eta if now + self.min_recheck < eta < hopeless else hopeless
        self.set_timer(q, now, max(when, now + self.min_recheck))

    def admission_eta(self, q: Queued, now: float) -> float | None:
        """Earliest time the running batch will have drained enough to admit `q`, or None if too late.

        SLA requests queued ahead of `q` are counted as taking slots and never leaving (a
        deliberately cautious view); running requests drain at the model's speed.
        """
        speed = self.engine.model.speed
        cap = self.engine.cap
        ahead = bisect_left(self.order, q.key)
        L_eff = len(self.batch.running) + ahead
        W = self.batch.W
        D = q.req.deadline - self.margin
        v1 = speed(1)
        latest = D - q.expected / v1
        t = now
        gen = 0.0
        for k, _, _ in self.batch.by_finish:
            if t > latest:
                return None
            need = max(q.expected / (D - t), q.tpot_speed)
            if L_eff < cap and speed(L_eff + 1) / self.headroom >= need:
                return t
            rem = k - W
            if rem > gen:
                t += (rem - gen) / speed(L_eff)
                gen = rem
            L_eff -= 1
        if t > latest:
            return None
        need = max(q.expected / (D - t), q.tpot_speed)
        if (L_eff == 0 and need <= v1) or (L_eff < cap and speed(L_eff + 1) / self.headroom >= need):
            return t
        return None

    def retry_after(self, now: float) -> float:
        """Seconds until the engine is predicted to have room, counting the queued SLA requests."""
        L = len(self.batch.running)
        if not L:
            return 0.1
        v = self.engine.model.speed(L)
        first = max(self.batch.by_finish[0][0] - self.batch.W, 0.0) / v
        drain = max(self.batch.by_finish[-1][0] - self.batch.W, 0.0) / v
        estimate = first + drain / L * len(self.queued)
        return min(60.0, max(0.1, estimate))
