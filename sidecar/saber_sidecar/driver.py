"""The real-time driver of a pure admission policy: wall clock, one timer, a future per request.

The policy decides; the driver only keeps its obligations (see `policy/base.py`): it passes
`time.monotonic()` as `now`, carries out every action in order, and keeps exactly one timer armed
at `policy.next_wake()` (event-driven: nothing runs between arrivals, completions and deadlines).

Hot reload: a config whose classes or scheduling changed gets a new policy instance, built
before anything changes (a config the policy refuses leaves the old one in force). The new
instance takes over every request: it inherits what the old one learned where its config keeps
the same prior (`Policy.inherit`), adopts the requests still running (`Policy.adopt`: they count
against its limits from the first moment) and is submitted the requests still queued (cancelled
in the old one first), which it decides afresh. So one instance owns every request, and the
new limits hold across the reload.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from saber_sidecar.config import SidecarConfig
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

log = logging.getLogger(__name__)

Decision = Admit | Reject


class Gate:
    def __init__(
        self,
        policy: Policy,
        config: SidecarConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._config = config
        self._policy = policy
        self._owner: dict[str, Policy] = {}
        self._requests: dict[str, Request] = {}  # submitted and not yet ended, for a reload
        self._futures: dict[str, asyncio.Future[Decision]] = {}
        self._demoted: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._queued = 0  # submitted, not yet admitted/rejected/cancelled (all generations)

    # -- what the proxy reads ----------------------------------------------------------------

    @property
    def config(self) -> SidecarConfig:
        return self._config

    @property
    def policy(self) -> Policy:
        return self._policy

    def now(self) -> float:
        return self._clock()

    def stats(self) -> PolicyStats:
        return self._policy.stats()

    @property
    def queued(self) -> int:
        return self._queued

    def was_demoted(self, request_id: str) -> bool:
        return request_id in self._demoted

    # -- requests ------------------------------------------------------------------------------

    async def admit(self, req: Request) -> Decision:
        """Submit and wait for the policy's decision; a cancelled wait (client gone) frees the request."""
        if self._queued >= self._config.scheduling.max_queue:
            return Reject(req.id, QUEUE_FULL, retry_after_s=1.0)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Decision] = loop.create_future()
        policy = self._policy
        self._futures[req.id] = fut
        self._owner[req.id] = policy
        self._requests[req.id] = req
        self._queued += 1
        try:
            self._run(policy, policy.submit(req, self._clock()))
        except BaseException:
            self._forget_queued(req.id)
            self._drop(req.id)
            raise
        try:
            return await fut
        except asyncio.CancelledError:
            if req.id in self._futures:  # still queued in the policy
                self._forget_queued(req.id)
                owner = self._owner.get(req.id, policy)  # a reload may have moved it
                self._run(owner, owner.cancel(req.id, self._clock()))
                self._drop(req.id)
            raise

    def first_token(self, request_id: str) -> None:
        """An admitted request's first streamed token reached the sidecar."""
        policy = self._owner.get(request_id)
        if policy is not None and request_id not in self._futures:  # admitted, not yet finished
            self._run(policy, policy.first_token(request_id, self._clock()))

    def finished(
        self,
        request_id: str,
        output_tokens: int,
        first_token_at: float | None,
        completed: bool = True,
        *,
        prompt_tokens: int | None = None,
    ) -> None:
        """An admitted request ended for any reason; must be called exactly once per Admit.

        `completed=False` for one cut off (client gone, engine error): `output_tokens` is then what
        it produced before that, which the policy must not learn lengths or speeds from.
        `prompt_tokens`: the prompt length from the engine's `usage`, when the relay saw it.
        """
        policy = self._owner.get(request_id)
        if policy is None:
            return
        try:
            now = self._clock()
            self._run(policy, policy.finished(request_id, now, output_tokens, first_token_at, completed=completed,
                                              prompt_tokens=prompt_tokens))
        finally:
            self._drop(request_id)

    def observe_engine(self, snapshot: EngineSnapshot) -> None:
        self._run(self._policy, self._policy.observe_engine(snapshot, self._clock()))

    # -- reload --------------------------------------------------------------------------------

    def set_config(self, config: SidecarConfig, make_policy: Callable[[SidecarConfig], Policy]) -> bool:
        """Apply a new config; returns True when a new policy instance was built."""
        old = self._config
        if config.scheduling == old.scheduling and config.classes == old.classes:
            # Only what the proxy reads changed (e.g. the default class): keep the instance and
            # what it has learned. Policies read classes at construction, so a class change
            # rebuilds them like a scheduling change does.
            self._config = config
            return False
        # All or nothing: the new policy is built before anything changes, so a config the
        # policy refuses (make_policy raises) leaves the old config and policy in force.
        policy = make_policy(config)
        old_policy = self._policy
        self._config = config
        self._policy = policy
        now = self._clock()
        policy.inherit(old_policy)
        # Running first (they hold engine seats), then the queue, in arrival order.
        queued = [rid for rid in self._requests if rid in self._futures]
        for rid, owner in list(self._owner.items()):
            if rid not in self._futures and owner is old_policy:
                policy.adopt(self._requests[rid], now)
                self._owner[rid] = policy
        for rid in queued:
            req = self._requests[rid]
            self._run(old_policy, old_policy.cancel(rid, now))
            req.best_effort, req.admitted_at = False, None  # decided afresh
            self._demoted.discard(rid)
            self._owner[rid] = policy
            try:
                actions = policy.submit(req, now)
            except ValueError as exc:  # e.g. its class is gone from the new config
                actions = [Reject(rid, f"the configuration changed while it waited ({exc})")]
            self._run(policy, actions)
        self._rearm()
        return True

    # -- internals -----------------------------------------------------------------------------

    def _forget_queued(self, request_id: str) -> None:
        if self._futures.pop(request_id, None) is not None:
            self._queued -= 1

    def _drop(self, request_id: str) -> None:
        self._owner.pop(request_id, None)
        self._requests.pop(request_id, None)
        self._demoted.discard(request_id)

    def _run(self, policy: Policy, actions: list[Action]) -> None:
        for action in actions:
            self._carry_out(policy, action)
        self._rearm()

    def _carry_out(self, policy: Policy, action: Action) -> None:
        rid = action.request_id
        if isinstance(action, Demote):
            self._demoted.add(rid)
            return
        fut = self._futures.get(rid)
        self._forget_queued(rid)
        if fut is None or fut.done():
            # The client left while the decision was in flight: give an admitted slot straight back.
            if isinstance(action, Admit) and rid in self._owner:
                self._run(policy, policy.finished(rid, self._clock(), 0, None, completed=False))
                self._drop(rid)
            elif isinstance(action, Reject):
                self._drop(rid)
            return
        if isinstance(action, Reject):
            self._drop(rid)
        fut.set_result(action)

    def _rearm(self) -> None:
        when = self._policy.next_wake()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            delay = max(0.0, when - self._clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self._clock()
        try:
            policy = self._policy
            wake = policy.next_wake()
            if wake is not None and wake <= now + 1e-6:
                for action in policy.wake(now):
                    self._carry_out(policy, action)
        except Exception:
            log.exception("policy wake failed")
        finally:
            self._rearm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
