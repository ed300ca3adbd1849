"""The driver's obligations, checked with a small scripted policy written for these tests.

The real policies have their own tests; this one only needs to queue, admit, time out and count
calls, so that what is checked is the driver: futures, one timer, cancellation, reload.
"""

import asyncio
import time

import pytest

from saber_sidecar.config import paper_config
from saber_sidecar.driver import QUEUE_FULL, Gate
from saber_sidecar.policy.base import Admit, Demote, Policy, PolicyStats, Reject, Request


class ScriptedCapPolicy(Policy):
    """FIFO with a concurrency cap; a queued request still waiting at its deadline is rejected."""

    name = "scripted-cap"

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.queue: list[Request] = []
        self.running: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.wakes: list[float] = []

    def _fill(self, now):
        out = []
        while self.queue and len(self.running) < self.cap:
            r = self.queue.pop(0)
            self.running.add(r.id)
            out.append(Admit(r.id, best_effort=r.best_effort))
        return out

    def submit(self, req, now):
        self.calls.append(("submit", req.id))
        self.queue.append(req)
        return self._fill(now)

    def finished(self, request_id, now, output_tokens, first_token_at, *, completed=True, prompt_tokens=None):
        self.calls.append(("finished", request_id) if completed else ("finished-cut-off", request_id))
        self.running.discard(request_id)
        return self._fill(now)

    def adopt(self, req, now):
        self.calls.append(("adopt", req.id))
        self.running.add(req.id)

    def cancel(self, request_id, now):
        self.calls.append(("cancel", request_id))
        self.queue = [r for r in self.queue if r.id != request_id]
        return []

    def wake(self, now):
        self.wakes.append(now)
        expired = [r for r in self.queue if r.deadline <= now]
        self.queue = [r for r in self.queue if r.deadline > now]
        return [Demote(r.id, "deadline") for r in expired] + [Reject(r.id, "deadline passed") for r in expired]

    def next_wake(self):
        return min((r.deadline for r in self.queue), default=None)

    def stats(self):
        return PolicyStats(queued_sla=len(self.queue), running=len(self.running), admission_limit=self.cap)


def req(rid, deadline_in=30.0):
    now = time.monotonic()
    return Request(id=rid, sla_class="generation", arrival=now, deadline=now + deadline_in, max_tokens=10,
                   expected_tokens=10)


async def test_admits_under_cap_and_queues_over_it():
    policy = ScriptedCapPolicy(cap=1)
    gate = Gate(policy, paper_config(policy="static"))
    assert await gate.admit(req("a")) == Admit("a")
    waiting = asyncio.create_task(gate.admit(req("b")))
    await asyncio.sleep(0.01)
    assert not waiting.done() and gate.queued == 1
    gate.finished("a", 10, None)
    assert await asyncio.wait_for(waiting, 1) == Admit("b")
    assert gate.queued == 0
    gate.close()


async def test_deadline_timer_fires_without_polling():
    policy = ScriptedCapPolicy(cap=1)
    gate = Gate(policy, paper_config(policy="static"))
    await gate.admit(req("a"))
    started = time.monotonic()
    decision = await asyncio.wait_for(gate.admit(req("b", deadline_in=0.15)), 2)
    elapsed = time.monotonic() - started
    assert isinstance(decision, Reject) and decision.reason == "deadline passed"
    assert gate.was_demoted("b") is False  # forgotten once rejected
    assert 0.14 <= elapsed < 0.5
    assert len(policy.wakes) == 1  # one timer, armed at the deadline; no ticks before it
    gate.close()


async def test_client_gone_while_queued_cancels_in_policy():
    policy = ScriptedCapPolicy(cap=1)
    gate = Gate(policy, paper_config(policy="static"))
    await gate.admit(req("a"))
    waiting = asyncio.create_task(gate.admit(req("b")))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert ("cancel", "b") in policy.calls and gate.queued == 0 and policy.queue == []
    gate.finished("a", 1, None)
    assert policy.running == set()
    gate.close()


async def test_queue_full_is_refused_before_the_policy():
    policy = ScriptedCapPolicy(cap=1)
    gate = Gate(policy, paper_config(policy="static", max_queue=1))
    await gate.admit(req("a"))
    waiting = asyncio.create_task(gate.admit(req("b")))
    await asyncio.sleep(0.01)
    decision = await gate.admit(req("c"))
    assert isinstance(decision, Reject) and decision.reason == QUEUE_FULL
    assert ("submit", "c") not in policy.calls
    waiting.cancel()
    gate.close()


async def test_reload_hands_running_and_queued_requests_to_the_new_policy():
    old = ScriptedCapPolicy(cap=2)
    gate = Gate(old, paper_config(policy="static"))
    await gate.admit(req("a"))
    await gate.admit(req("b"))
    waiting = asyncio.create_task(gate.admit(req("c")))
    await asyncio.sleep(0.01)
    new = ScriptedCapPolicy(cap=1)
    assert gate.set_config(paper_config(policy="static", static_max_concurrency=1), lambda cfg: new) is True
    assert gate.policy is new
    # The running requests count against the new cap at once; the queued one moved over.
    assert new.running == {"a", "b"} and [r.id for r in new.queue] == ["c"]
    assert ("cancel", "c") in old.calls
    gate.finished("a", 3, None)
    await asyncio.sleep(0.01)
    assert not waiting.done()  # b still runs: the new cap of 1 holds
    gate.finished("b", 3, None)
    assert await asyncio.wait_for(waiting, 1) == Admit("c")
    assert ("finished", "a") in new.calls and ("finished", "a") not in old.calls
    # A change the policy does not read (the default class) keeps the instance.
    cfg = paper_config(policy="static", static_max_concurrency=1).model_copy(update={"default_class": "qna"})
    assert gate.set_config(cfg, lambda c: ScriptedCapPolicy(1)) is False and gate.policy is new
    gate.close()


async def test_a_refused_reload_changes_nothing():
    old = ScriptedCapPolicy(cap=1)
    cfg = paper_config(policy="static")
    gate = Gate(old, cfg)
    await gate.admit(req("a"))

    def refuse(config):
        raise ValueError("speed model refuses these params")

    with pytest.raises(ValueError, match="refuses"):
        gate.set_config(paper_config(policy="static", static_max_concurrency=7), refuse)
    assert gate.config is cfg and gate.policy is old
    gate.finished("a", 1, None)
    assert ("finished", "a") in old.calls
    gate.close()


async def test_cut_off_requests_reach_the_policy_as_not_completed():
    policy = ScriptedCapPolicy(cap=1)
    gate = Gate(policy, paper_config(policy="static"))
    await gate.admit(req("a"))
    waiting = asyncio.create_task(gate.admit(req("b")))
    await asyncio.sleep(0.01)
    waiting.cancel()  # b's client leaves: its wait is cancelled at once...
    gate.finished("a", 3, None, completed=False)  # ...and a is cut off, which admits b too late
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert ("finished-cut-off", "a") in policy.calls
    assert ("finished-cut-off", "b") in policy.calls  # b's slot went straight back, as cut off
    assert policy.running == set() and gate.queued == 0
    gate.close()
