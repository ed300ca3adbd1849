"""A capacity reference: about how much goodput any admission policy could get from this engine.

Engine time is the scarce resource. A step of the engine with L requests decoding takes `tau(L)`
seconds and gives each of them one token, so each token costs `tau(L) / L` engine-seconds. A
request j with deadline SLA_j and n_j output tokens must average at least `n_j / SLA_j` tokens/s,
so its tokens must come from steps of batch at most `L_j` (the largest L with `v(L) >= n_j/SLA_j`).
With `tau` (close to) affine in L, the cheapest way to meet that is to run at batch `L_j` all along,
so request j needs at least `p_j = n_j * tau(L_j) / L_j + prompt_j * prefill_cost` engine-seconds
between its arrival r_j and its deadline d_j; a request that cannot finish in time even alone on
the engine is never counted.

The largest number of requests that can all meet their deadlines is then bounded by a preemptive
one-machine problem with release dates: for any time `a`, requests released at or after `a` must
fit into `[a, d]` windows, which is the Moore-Hodgson problem with all of them released at `a`
(solved exactly); requests released before `a` are all counted as met. The minimum over `a` is the
reference. It ignores step granularity and queueing of prefills, and `tau` is piecewise linear
rather than affine, so it is an optimistic reference of what is possible, not a schedule or a proof.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from saber_emulator.engine import EngineConfig
from saber_emulator.profile import LatencyProfile

from .workloads import RequestSpec


def _moore_hodgson(jobs: list[tuple[float, float]], start: float) -> int:
    """Most jobs (due, processing) that one machine free from `start` can finish by their due dates."""
    t = start
    taken: list[float] = []  # max-heap of processing times (negated)
    for due, p in sorted(jobs):
        heapq.heappush(taken, -p)
        t += p
        if t > due + 1e-12:
            t += heapq.heappop(taken)  # drop the longest job so far
    return len(taken)


def _largest_batch(profile: LatencyProfile, need: float, max_batch: int) -> int:
    """Largest L <= max_batch with v(L) >= need (v is non-increasing in L); 0 if none."""
    if profile.speed(1) < need:
        return 0
    lo, hi = 1, max_batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if profile.speed(mid) >= need:
            lo = mid
        else:
            hi = mid - 1
    return lo


def engine_seconds(spec: RequestSpec, profile: LatencyProfile, max_batch: int) -> float | None:
    """Least engine time request `spec` needs to meet its deadline; None if it cannot alone."""
    first_token = profile.step_time(0, spec.prompt_tokens)
    budget = spec.sla_s - first_token
    if budget < 0:
        return None
    decode = spec.output_tokens - 1
    prefill = spec.prompt_tokens * profile.prefill_s_per_token
    if decode <= 0:
        return prefill
    if budget == 0:
        return None
    batch = _largest_batch(profile, decode / budget, max_batch)
    if batch == 0:
        return None
    return prefill + decode * profile.decode_time(batch) / batch


def capacity_bound(specs: Sequence[RequestSpec], profile: LatencyProfile, engine: EngineConfig) -> float:
    """Optimistic reference goodput (0..1) of the run `specs` on this engine."""
    n = len(specs)
    if n == 0:
        return float("nan")
    jobs = []
    for s in specs:
        p = engine_seconds(s, profile, engine.max_num_seqs)
        if p is not None:
            jobs.append((s.arrival, s.deadline, p))
    jobs.sort()
    best = len(jobs)
    # Any subset of start times gives a valid bound; 200 keeps long runs cheap.
    for i in range(0, len(jobs), max(1, len(jobs) // 200)):
        a = jobs[i][0]
        best = min(best, i + _moore_hodgson([(d, p) for (_, d, p) in jobs[i:]], a))
    return best / n
