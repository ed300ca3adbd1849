"""The capacity search of the live harnesses on real vLLM (`live_vllm`, `trace_live`, `peer`).

An engine's capacity for a workload is the highest rate at which vLLM's own cap (a pass-through
sidecar) meets PROBE_TARGET of the deadlines. A real engine has no profile that gives it exactly
(HTTP, tokenising and the machine's contention are not in any profile), so it is searched live:
from a start rate, doubled while probes pass and halved while they fail, until one probe passes and
one fails; then bisected (geometrically) until the two are within PROBE_RESOLUTION of each other or
the probes are spent. Searching both ways matters: a start that passes is not the capacity (run 3 of
the proof stopped at its first passing rate, so its "2x" was the engine's knee and vLLM's cap met
87% there).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

PROBE_TARGET = 0.9       # capacity: the highest rate at which vLLM's own cap meets this share of SLOs
PROBE_RESOLUTION = 1.15  # the search stops when a passing and a failing rate are this close
PROBE_STEPS = 7


def next_rate(rate: float, lo: float | None, hi: float | None) -> float:
    """The next rate to probe, from the highest passing (`lo`) and lowest failing (`hi`) so far."""
    if hi is None:
        return round(2 * rate, 2)
    if lo is None:
        return round(rate / 2, 2)
    return round(math.sqrt(lo * hi), 2)


async def search_capacity(probe: Callable[[float], Awaitable[dict]], start: float, *,
                          target: float = PROBE_TARGET, resolution: float = PROBE_RESOLUTION,
                          steps: int = PROBE_STEPS) -> dict:
    """`probe(rate)` runs vLLM's own cap at `rate` and returns at least {"goodput": fraction}.
    Returns {"capacity_rps", "first_failing_rps", "target", "probes"}; raises RuntimeError when no
    probed rate passed (the harness cannot scale a workload to an engine it never saw meet it)."""
    lo: float | None = None
    hi: float | None = None
    probes: list[dict] = []
    rate = round(start, 2)
    for _ in range(steps):
        result = await probe(rate)
        probes.append({"rate": rate, **result})
        print(f"capacity probe {len(probes)}: {rate:g} req/s, vLLM's own cap meets {100 * result['goodput']:.0f}%",
              flush=True)
        if result["goodput"] >= target:
            lo = rate if lo is None else max(lo, rate)
        else:
            hi = rate if hi is None else min(hi, rate)
        if lo is not None and hi is not None and hi / lo <= resolution:
            break
        rate = next_rate(rate, lo, hi)
    if lo is None:
        raise RuntimeError(f"capacity probe: vLLM's own cap met {100 * target:.0f}% at no probed rate: {probes}")
    print(f"capacity: {lo:g} req/s (vLLM's own cap meets {100 * target:.0f}% of the deadlines there"
          + (f", not at {hi:g})" if hi else ")"), flush=True)
    return {"capacity_rps": lo, "first_failing_rps": hi, "target": target, "probes": probes}
