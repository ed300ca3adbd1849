"""The discrete-event simulator: the sidecar's own policy in front of the emulator's engine model.

Virtual time, one heap of events (arrivals, engine scrapes) plus two timers that are always known
exactly: the end of the engine step in progress and the policy's `next_wake()`. The policy is
driven as the sidecar's `Gate` drives it: `submit` at arrival, every action carried out in order,
`first_token(id, now)` when the engine makes an admitted request's first token,
`finished(id, now, output_tokens, first_token_at)` when the engine finishes it,
`wake` at `next_wake()`, and `observe_engine` every scrape interval with the engine's state.

An admitted request enters the engine at once; like vLLM, the engine takes it into the batch at
its next step. The engine generates the request's true output length (`RequestSpec.output_tokens`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from saber_emulator.engine import EngineConfig, EngineCore, EngineRequest
from saber_emulator.profile import LatencyProfile
from saber_sidecar.policy.base import Admit, Demote, EngineSnapshot, Policy, Reject, Request

from .metrics import RequestRecord
from .workloads import RequestSpec

# The sidecar's default scrape interval of the engine's /metrics (SidecarSettings.scrape_interval_s).
DEFAULT_SCRAPE_INTERVAL_S = 0.5

_ARRIVAL, _SCRAPE = 0, 1

RequestBuilder = Callable[[RequestSpec, float], Request]


@dataclass(slots=True)
class SimResult:
    records: list[RequestRecord]
    end_time: float
    engine_steps: int
    preemptions: int
    policy_calls: int


MAX_WAKES_AT_ONE_INSTANT = 10_000


class SimulationError(RuntimeError):
    """The run broke a driver invariant (a policy that never decides, an engine that stalls)."""


def simulate(
    specs: Sequence[RequestSpec],
    policy: Policy,
    engine: EngineCore,
    build_request: RequestBuilder,
    scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S,
    engine_priority: bool = False,
    horizon_s: float | None = None,
) -> SimResult:
    """Run every request of `specs` to completion (or rejection); returns one record per request.

    `horizon_s` bounds virtual time (default: last arrival + 1 hour) so a policy that never admits
    a request ends the run with that request unfinished instead of looping forever.
    """
    by_id = {s.id: s for s in specs}
    if len(by_id) != len(specs):
        raise ValueError("request ids must be unique")
    records = {s.id: RequestRecord(s.id, s.sla_class, s.arrival, s.sla_s, ttft_slo_s=s.ttft_s, tpot_slo_s=s.tpot_s) for s in specs}
    heap: list[tuple[float, int, int, str]] = []
    for i, s in enumerate(specs):
        heap.append((s.arrival, _ARRIVAL, i, s.id))
    heapq.heapify(heap)
    last_arrival = max((s.arrival for s in specs), default=0.0)
    horizon = horizon_s if horizon_s is not None else last_arrival + 3600.0
    outstanding = len(specs)  # not yet rejected, finished or given up
    calls = 0
    step = None  # the engine step in progress (its results land at step.end)
    seq = len(specs)
    if specs:
        heapq.heappush(heap, (min(s.arrival for s in specs), _SCRAPE, seq, ""))
        seq += 1

    def carry_out(actions, now: float, start_step: bool = True) -> None:
        nonlocal outstanding, step
        for a in actions:
            rec = records[a.request_id]
            if isinstance(a, Admit):
                spec = by_id[a.request_id]
                rec.admitted_at = now
                rec.demoted = rec.demoted or a.best_effort
                engine.add_request(
                    EngineRequest(
                        id=spec.id,
                        prompt_tokens=spec.prompt_tokens,
                        max_tokens=spec.max_tokens,
                        output_tokens=spec.output_tokens,
                        priority=1 if (engine_priority and a.best_effort) else 0,
                        arrival_time=now,
                    )
                )
            elif isinstance(a, Reject):
                rec.rejected = True
                outstanding -= 1
            elif isinstance(a, Demote):
                rec.demoted = True
        if start_step and step is None and engine.has_work:
            step = engine.step(now)

    now = 0.0
    stuck_wakes, last_wake = 0, -math.inf  # wakes in a row at one instant: such a policy never advances time
    while outstanding > 0:
        t_event = heap[0][0] if heap else math.inf
        wake = policy.next_wake()
        t_wake = wake if wake is not None else math.inf
        t_step = step.end if step is not None else math.inf
        # Idle engine whose waiting requests are still in the serving stack's fixed per-request
        # path (profile.request_overhead_s): step again when the first of them is ready.
        ready = engine.next_ready_time() if step is None and engine.has_work else None
        t_ready = ready if ready is not None and ready > now else math.inf
        now_next = min(t_event, t_wake, t_step, t_ready)
        if now_next == math.inf or now_next > horizon:
            break
        now = max(now, now_next)
        if t_ready <= now_next and t_ready < min(t_step, t_wake, t_event):
            step = engine.step(now)
        elif step is not None and t_step <= now_next:  # (t_step is finite only with a step)
            done, step = step, None
            for rid in done.first_token:  # the sidecar sees a streamed first token as it is made
                calls += 1
                # (the next step starts once the step's finishes are handled too, as before)
                carry_out(policy.first_token(rid, now), now, start_step=False)
            for f in done.finished:
                rec = records[f.id]
                rec.first_token_at = f.first_token_time
                rec.finished_at = f.finish_time
                rec.output_tokens = f.output_tokens
                outstanding -= 1
                calls += 1
                carry_out(policy.finished(f.id, now, f.output_tokens, f.first_token_time, completed=f.reason != "abort"), now)
            if step is None and engine.has_work:
                step = engine.step(now)
        elif t_wake <= now_next:
            stuck_wakes = stuck_wakes + 1 if t_wake == last_wake else 0
            last_wake = t_wake
            if stuck_wakes > MAX_WAKES_AT_ONE_INSTANT:
                raise SimulationError(f"{policy.name}: next_wake() stays at t={now:.6f} after "
                                      f"{MAX_WAKES_AT_ONE_INSTANT} wakes; the policy never lets time advance")
            calls += 1
            carry_out(policy.wake(now), now)
        else:
            _, kind, _, rid = heapq.heappop(heap)
            if kind == _ARRIVAL:
                calls += 1
                carry_out(policy.submit(build_request(by_id[rid], now), now), now)
            else:
                c = engine.counters
                snap = EngineSnapshot(
                    running=engine.num_running, waiting=engine.num_waiting, kv_cache_usage=engine.kv_cache_usage,
                    steps=c.steps, prompt_tokens=c.prompt_tokens, generation_tokens=c.generation_tokens,
                )
                calls += 1
                carry_out(policy.observe_engine(snap, now), now)
                heapq.heappush(heap, (now + scrape_interval_s, _SCRAPE, seq, ""))
                seq += 1

    for rec in records.values():
        if not rec.rejected and rec.finished_at is None:
            rec.error = "unfinished"
    return SimResult(
        records=[records[s.id] for s in specs],
        end_time=now,
        engine_steps=engine.counters.steps,
        preemptions=engine.counters.preemptions,
        policy_calls=calls,
    )


def default_engine(profile: LatencyProfile | None = None, seed: int = 0, **config: Any) -> EngineCore:
    """The emulator's engine with its default limits (a large `max_num_seqs`: the gate decides)."""
    from saber_emulator.profile import load_profile

    return EngineCore(EngineConfig(**config), profile or load_profile(None), seed=seed)
