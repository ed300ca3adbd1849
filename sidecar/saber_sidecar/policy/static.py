"""`static`: a fixed concurrency cap, FIFO. The baseline every vLLM user has today (`max_num_seqs`).

Admits in arrival order while fewer than `static_max_concurrency` requests run; queues the rest;
rejects only when the queue holds `max_queue` requests. No deadlines, no timers.
"""

from __future__ import annotations

from collections import deque

from saber_sidecar.config import SidecarConfig
from saber_sidecar.policy.base import QUEUE_FULL, Action, Admit, Policy, PolicyStats, Reject, Request


class StaticPolicy(Policy):
    name = "static"

    def __init__(self, config: SidecarConfig) -> None:
        self.cap = config.scheduling.static_max_concurrency
        self.max_queue = config.scheduling.max_queue
        self._queue: deque[str] = deque()  # ids; cancelled ones are skipped lazily
        self._queued: dict[str, Request] = {}
        self._running: set[str] = set()

    def submit(self, req: Request, now: float) -> list[Action]:
        if req.id in self._queued or req.id in self._running:
            raise ValueError(f"request id {req.id!r} is already known to the policy")
        if len(self._running) < self.cap and not self._queued:
            return [self._admit(req, now)]
        if len(self._queued) >= self.max_queue:
            return [Reject(req.id, QUEUE_FULL, retry_after_s=1.0)]
        self._queued[req.id] = req
        self._queue.append(req.id)
        return []

    def _admit(self, req: Request, now: float) -> Admit:
        req.admitted_at = now
        self._running.add(req.id)
        return Admit(req.id)

    def _drain(self, now: float) -> list[Action]:
        out: list[Action] = []
        while self._queue and len(self._running) < self.cap:
            req = self._queued.pop(self._queue.popleft(), None)
            if req is not None:
                out.append(self._admit(req, now))
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
        self._running.discard(request_id)
        return self._drain(now)

    def cancel(self, request_id: str, now: float) -> list[Action]:
        self._queued.pop(request_id, None)
        if not self._queued:
            self._queue.clear()
        return []

    def adopt(self, req: Request, now: float) -> None:
        self._running.add(req.id)

    def wake(self, now: float) -> list[Action]:
        return self._drain(now)

    def next_wake(self) -> float | None:
        return None

    def stats(self) -> PolicyStats:
        return PolicyStats(
            queued_sla=len(self._queued), running=len(self._running), admission_limit=self.cap
        )
