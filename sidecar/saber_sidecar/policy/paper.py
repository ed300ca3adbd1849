"""`saber-paper`: the SABER paper's Algorithm 1, reimplemented faithfully (see SABER.md).

Every `tick_seconds` (0.1 s) one dispatcher cycle runs:

1. If the HPQ holds requests, pick ONE at random among its first `pick_window` (20) entries.
   Its required speed is `max_tokens / (deadline - now)`. If the deadline has passed or the
   required speed exceeds v(1), the engine's single-request speed, demote it to the LPQ.
   Otherwise admit it iff v(L+1) >= its required speed AND v(L+1) >= the largest required speed
   among the running SLA requests; if not, put it back at the HPQ tail.
2. If the HPQ is empty, admit the LPQ head (FIFO, no check).
3. Every `sweep_every` (10) cycles, demote every HPQ request whose deadline has passed.

Interpretations we had to make, each the most literal reading of the paper:
- One request is decided per cycle, from the HPQ or (when it is empty) from the LPQ. The paper's
  dispatcher handles one pick per loop iteration and has no other cap, so admissions are limited
  to one per tick; L is the number of requests the gate has admitted and not yet seen finish.
- A running request's required speed is the one computed when it was admitted,
  `max_tokens / (deadline - admitted_at)`, and is not recomputed. The paper has no estimate of a
  running request's progress; recomputing `max_tokens / (deadline - now)` with the full
  `max_tokens` would grow without bound near each deadline and block all admission. Best-effort
  (LPQ) requests carry no required speed.
- v(L) is the configured (fitted) curve and is never refitted online: the paper fits it once,
  offline. Its `speed(L)` is the model's, which only differs from the raw formula past the
  curve's turning point (L ~ 150 for the paper's fit).
- The tick grid starts at the first time the policy sees; while both queues are empty there is
  nothing to dispatch and no wake is asked for (the paper's loop would spin idle); the next
  arrival waits for the next grid point, as it would in the paper's loop. Sweep cycles count
  only cycles that ran.
- The paper never rejects; a queue of `max_queue` requests (HPQ + LPQ) is answered with a
  rejection, because the sidecar's memory is finite.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque

from saber_sidecar.config import SidecarConfig
from saber_sidecar.policy.base import QUEUE_FULL, Action, Admit, Demote, Policy, PolicyStats, Reject, Request
from saber_sidecar.speed_model import SpeedModel


class PaperPolicy(Policy):
    name = "saber-paper"

    def __init__(self, config: SidecarConfig, seed: int = 0) -> None:
        sched = config.scheduling
        self.tick = sched.paper.tick_seconds
        self.pick_window = sched.paper.pick_window
        self.sweep_every = sched.paper.sweep_every
        self.max_queue = sched.max_queue
        self.model = SpeedModel.from_config(sched.speed_model, online_refit=False)
        self._rng = random.Random(seed)
        self._hpq: list[Request] = []
        self._hpq_ids: set[str] = set()
        self._hpq_deadlines: list[tuple[float, str]] = []  # lazy heap: lets the sweep skip in O(1)
        self._lpq: deque[Request] = deque()
        self._lpq_ids: set[str] = set()
        self._running: dict[str, float] = {}  # id -> required speed fixed at admission (0 for LPQ)
        self._origin: float | None = None
        self._next_tick: float | None = None
        self.cycles = 0

    # -- driver calls -------------------------------------------------------------------------

    def submit(self, req: Request, now: float) -> list[Action]:
        if req.id in self._hpq_ids or req.id in self._lpq_ids or req.id in self._running:
            raise ValueError(f"request id {req.id!r} is already known to the policy")
        self._start_clock(now)
        if len(self._hpq_ids) + len(self._lpq_ids) >= self.max_queue:
            return [Reject(req.id, QUEUE_FULL, retry_after_s=1.0)]
        self._hpq.append(req)
        self._hpq_ids.add(req.id)
        heapq.heappush(self._hpq_deadlines, (req.deadline, req.id))
        self._schedule_tick(now)
        return []

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
        self._running.pop(request_id, None)
        return []  # freed capacity is used at the next tick, as in the paper's polling loop

    def adopt(self, req: Request, now: float) -> None:
        # The speed it needs from now, as at an admission (0 for best effort: nothing to protect).
        remaining = req.deadline - now
        self._running[req.id] = 0.0 if req.best_effort or remaining <= 0 else req.max_tokens / remaining

    def cancel(self, request_id: str, now: float) -> list[Action]:
        if request_id in self._hpq_ids:
            self._hpq_ids.discard(request_id)
            self._hpq = [r for r in self._hpq if r.id != request_id]
        elif request_id in self._lpq_ids:
            self._lpq_ids.discard(request_id)
            self._lpq = deque(r for r in self._lpq if r.id != request_id)
        if not self._hpq_ids and not self._lpq_ids:
            self._next_tick = None
        return []

    def wake(self, now: float) -> list[Action]:
        if self._next_tick is None or now < self._next_tick:
            return []
        actions = self._cycle(now)
        self._next_tick = None
        self._schedule_tick(now)
        return actions

    def next_wake(self) -> float | None:
        return self._next_tick

    def stats(self) -> PolicyStats:
        L = len(self._running)
        return PolicyStats(
            queued_sla=len(self._hpq_ids),
            queued_best_effort=len(self._lpq_ids),
            running=L,
            predicted_speed=self.model.speed(L + 1),
            speed_model_r2=self.model.r2,
            speed_model_error_ratio=self.model.error_ratio,
            extra={"cycles": float(self.cycles)},
        )

    # -- Algorithm 1 ---------------------------------------------------------------------------

    def _cycle(self, now: float) -> list[Action]:
        self.cycles += 1
        out: list[Action] = []
        if self._hpq:
            i = self._rng.randrange(min(self.pick_window, len(self._hpq)))
            req = self._hpq.pop(i)
            self._hpq_ids.discard(req.id)
            remaining = req.deadline - now
            v1 = self.model.speed(1)
            if remaining <= 0 or req.max_tokens / remaining > v1:
                why = "deadline passed" if remaining <= 0 else "required speed exceeds single-request speed"
                out.append(self._demote(req, why))
            else:
                required = req.max_tokens / remaining
                v_next = self.model.speed(len(self._running) + 1)
                running_max = max(self._running.values(), default=0.0)
                if v_next >= required and v_next >= running_max:
                    req.admitted_at = now
                    self._running[req.id] = required
                    out.append(Admit(req.id))
                else:
                    self._hpq.append(req)
                    self._hpq_ids.add(req.id)
        elif self._lpq:
            req = self._lpq.popleft()
            self._lpq_ids.discard(req.id)
            req.admitted_at = now
            self._running[req.id] = 0.0
            out.append(Admit(req.id, best_effort=True))
        if self.cycles % self.sweep_every == 0:
            out.extend(self._sweep(now))
        return out

    def _sweep(self, now: float) -> list[Action]:
        heap = self._hpq_deadlines
        while heap and heap[0][1] not in self._hpq_ids:
            heapq.heappop(heap)  # drop entries of requests no longer in the HPQ
        if not heap or heap[0][0] > now:
            return []
        expired = [r for r in self._hpq if r.deadline <= now]
        self._hpq = [r for r in self._hpq if r.deadline > now]
        out: list[Action] = []
        for req in expired:
            self._hpq_ids.discard(req.id)
            out.append(self._demote(req, "deadline passed"))
        return out

    def _demote(self, req: Request, reason: str) -> Demote:
        req.best_effort = True
        self._lpq.append(req)
        self._lpq_ids.add(req.id)
        return Demote(req.id, reason)

    # -- the tick grid -------------------------------------------------------------------------

    def _start_clock(self, now: float) -> None:
        if self._origin is None:
            self._origin = now

    def _schedule_tick(self, now: float) -> None:
        if self._next_tick is not None or not (self._hpq_ids or self._lpq_ids):
            return
        assert self._origin is not None
        k = math.floor((now - self._origin) / self.tick + 1e-9) + 1
        self._next_tick = self._origin + k * self.tick
