"""Decision cost of each policy with 1,000 requests queued.

    python -m saber_bench.perf.policy --out DIR [--queued 1000] [--ops 2000] [--running N]

For each policy the engine is filled (the policy admits what it will at t=0 from a burst of the
paper's four task classes), then `--queued` more requests wait. Timed, one call at a time:

- submit:   a new request arrives and is queued (then cancelled, untimed, to hold the queue size);
- finished: a running request ends and the policy admits from the queue (the queue is refilled,
            untimed);
- wake:     the paper's dispatcher tick (saber-paper only; the others have no tick).

Requests keep their classes' real deadlines (the clock creeps forward a microsecond per call, so
the queue does not go hopeless). Online refitting is off while decisions are timed, because
its cost is not a decision's: it is measured on its own (`speed_model_refit`: one refit of a
full 512-sample window; the sidecar pays it once every `refit_every` finished requests).

`--running N` (default: off) also measures `saber` with N requests running (its replay of the
batch is O(running); the paper's classes have it admit 39 at t=0), in two settings, written under
the key "running" of policy_perf.json (the default protocol and its output are unchanged):

- tight:       one class with a one-hour deadline and an output length sized so that saber admits
               exactly N at t=0 (its deadlines bind), then `--queued` more wait; submit and
               finished are timed as above (each finished admits the head of the queue, which
               barely fits).
- closed_loop: the sidecar under a steady load of N streams with a one-hour deadline (64 output
               tokens, 80 prompt tokens): N running, nothing queued; timed, in turn, a running
               request finishing (nothing to admit) and an arrival (admitted at once).

Writes DIR/policy_perf.json with mean, median, p99 and max nanoseconds per call, and prints a
table. The budget is 20 µs per decision.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from saber_sidecar.config import PolicyName, paper_config
from saber_sidecar.policy import Admit, make_policy, request_for

TASKS = (("qna", 51), ("summary", 48), ("generation", 387), ("translation", 617))
BUDGET_NS = 20_000


def _summary(samples: list[int]) -> dict:
    ordered = sorted(samples)
    return {
        "calls": len(samples),
        "mean_ns": statistics.fmean(samples),
        "median_ns": ordered[len(ordered) // 2],
        "p99_ns": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "max_ns": ordered[-1],
    }


def _timed_submits(pol, ops: int, now: float, new_request, apply, kept) -> tuple[list[int], float]:
    """Time `ops` arrivals one by one; any not admitted (not in `kept`) is cancelled, untimed, so
    the queue keeps its size. Returns the samples and the clock."""
    samples: list[int] = []
    for _ in range(ops):
        now += 1e-6
        req = new_request(now)
        t0 = time.perf_counter_ns()
        actions = pol.submit(req, now)
        samples.append(time.perf_counter_ns() - t0)
        apply(actions)
        if req.id not in kept:
            pol.cancel(req.id, now)
    return samples, now


def _timed_finishes(pol, ops: int, now: float, running: list[str], output_of, new_request, apply) -> tuple[list[int], float]:
    """Time `ops` finishes, one running request at a time (`output_of(id)` its output tokens), each
    followed, untimed, by an arrival that takes its place. Returns the samples and the clock."""
    samples: list[int] = []
    for i in range(ops):
        now += 1e-6
        if not running:
            break
        rid = running.pop(i % len(running))
        t0 = time.perf_counter_ns()
        actions = pol.finished(rid, now, output_of(rid), None)
        samples.append(time.perf_counter_ns() - t0)
        apply(actions)
        apply(pol.submit(new_request(now), now))
    return samples, now


def _at_end(pol) -> dict[str, int]:
    stats = pol.stats()
    return {"queued_at_end": stats.queued_sla + stats.queued_best_effort, "running_at_end": stats.running}


def measure(policy_name: PolicyName, queued: int, ops: int) -> dict[str, Any]:
    cfg = paper_config(policy_name, max_queue=max(10 * queued, 1024))
    cfg.scheduling.speed_model.online_refit = False
    pol = make_policy(cfg, seed=1)
    now = 0.0
    seq = 0
    running: list[str] = []
    tokens: dict[str, int] = {}  # finished requests report their full output

    def new_request(t: float):
        nonlocal seq
        seq += 1
        name, mt = TASKS[seq % len(TASKS)]
        tokens[f"r{seq}"] = mt
        return request_for(cfg, name, f"r{seq}", t, mt)

    def apply(actions) -> None:
        for a in actions:
            if isinstance(a, Admit):
                running.append(a.request_id)

    # Fill the engine, then the queue.
    while pol.stats().queued_sla + pol.stats().queued_best_effort < queued:
        apply(pol.submit(new_request(now), now))
        if policy_name == "saber-paper" and seq % 10 == 0:
            now = pol.next_wake() or now
            apply(pol.wake(now))
    results: dict = {"queued": queued, "running_at_start": len(running)}

    gc.collect()
    gc.disable()
    try:
        samples, now = _timed_submits(pol, ops, now, new_request, apply, running)
        results["submit"] = _summary(samples)

        samples, now = _timed_finishes(pol, ops, now, running, tokens.__getitem__, new_request, apply)
        results["finished"] = _summary(samples)

        if pol.next_wake() is not None:
            samples = []
            for _ in range(ops):
                now = max(now, pol.next_wake() or now)
                t0 = time.perf_counter_ns()
                actions = pol.wake(now)
                samples.append(time.perf_counter_ns() - t0)
                apply(actions)
                apply(pol.submit(new_request(now), now))
                if running:
                    rid = running.pop(0)
                    pol.finished(rid, now, tokens[rid], None)
            results["wake"] = _summary(samples)
    finally:
        gc.enable()
    results.update(_at_end(pol))
    return results


def _loose_config(name: str, output_tokens: int, queued: int):
    """One class with a one-hour deadline (refits off, as in `measure`)."""
    from saber_sidecar.config import SchedulingConfig, SidecarConfig, SLAClass

    cfg = SidecarConfig(
        classes=[SLAClass(name=name, deadline_seconds=3600.0, output_tokens=output_tokens)],
        default_class=name,
        scheduling=SchedulingConfig(policy="saber", max_queue=max(10 * queued, 1024)),
    )
    cfg.scheduling.speed_model.online_refit = False
    return cfg


def measure_running(running: int, queued: int, ops: int) -> dict:
    """`saber` with `running` requests running: batch held there by deadlines, and a closed loop."""
    from saber_sidecar.policy.saber_tuning import Tuning
    from saber_sidecar.speed_model import SpeedModel

    # Tight: the longest output that still fits `running` requests in a one-hour deadline with
    # the slack reserve: T x headroom / v(N) <= deadline - margin - reserve.
    probe = _loose_config("bulk", 1, queued)
    p = probe.scheduling.saber
    tuning = Tuning()  # the internal constants the policy runs with
    table = SpeedModel.from_config(probe.scheduling.speed_model).table
    if running + 3 >= len(table):
        raise ValueError(f"--running must be below {len(table) - 3}")
    budget = 3600.0 - p.deadline_margin_seconds - tuning.slack_reserve_share * 3600.0
    T = max(1, math.floor(budget * table[running] / (1.0 + tuning.speed_headroom)))
    cfg = _loose_config("bulk", T, queued)
    pol = make_policy(cfg, seed=1)
    now = 0.0
    seq = 0
    ids: list[str] = []

    def new_request(t: float, cfg=cfg, name="bulk", tokens=T, prompt=0):
        nonlocal seq
        seq += 1
        return request_for(cfg, name, f"r{seq}", t, tokens, prompt_tokens=prompt)

    def apply(actions) -> None:
        for a in actions:
            if isinstance(a, Admit):
                ids.append(a.request_id)

    while pol.stats().queued_sla < queued and seq < 10 * (queued + running) + 10:
        apply(pol.submit(new_request(now), now))
    tight: dict = {"output_tokens": T, "queued": pol.stats().queued_sla, "running_at_start": len(ids)}
    gc.collect()
    gc.disable()
    try:
        samples, now = _timed_submits(pol, ops, now, new_request, apply, ids)
        tight["submit"] = _summary(samples)
        admitted = len(ids)
        samples, now = _timed_finishes(pol, ops, now, ids, lambda _: T, new_request, apply)
        tight["finished"] = _summary(samples)
        tight["admitted_by_finished"] = len(ids) - admitted + len(samples)
    finally:
        gc.enable()
    tight.update(_at_end(pol))

    # Closed loop: every arrival admitted at once, `running` streams.
    cfg = _loose_config("bench", 64, queued)
    pol = make_policy(cfg, seed=1)
    ids = []
    now = 0.0
    while len(ids) < running:
        now += 1e-6
        apply(pol.submit(new_request(now, cfg, "bench", 64, 80), now))
    loop: dict = {"queued": 0, "running_at_start": len(ids)}
    gc.collect()
    gc.disable()
    try:
        fin: list[int] = []
        sub: list[int] = []
        for _ in range(ops):
            now += 1e-6
            rid = ids.pop(0)
            t0 = time.perf_counter_ns()
            pol.finished(rid, now, 64, None)
            fin.append(time.perf_counter_ns() - t0)
            now += 1e-6
            req = new_request(now, cfg, "bench", 64, 80)
            t0 = time.perf_counter_ns()
            actions = pol.submit(req, now)
            sub.append(time.perf_counter_ns() - t0)
            apply(actions)
        loop["submit"] = _summary(sub)
        loop["finished"] = _summary(fin)
    finally:
        gc.enable()
    loop.update(_at_end(pol))
    return {"running": running, "queued": queued, "tight": tight, "closed_loop": loop}


def measure_refit(repeats: int = 20) -> dict:
    """One online refit of a full window: 512 samples shaped like the paper's curve, with noise."""
    import random

    from saber_sidecar.speed_model import SpeedModel

    rng = random.Random(0)
    model = SpeedModel(online_refit=True, window=512, min_samples=32, refit_every=10**9)
    for _ in range(512):
        L = rng.uniform(1, 60)
        model.observe(L, 102.55 / (1 + 0.03 * L - 0.0001 * L * L) * rng.uniform(0.97, 1.03))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        model.refit()
        samples.append(time.perf_counter_ns() - t0)
    out = _summary(samples)
    out["form"] = model.form
    out["r2"] = model.r2
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m saber_bench.perf.policy", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for policy_perf.json")
    ap.add_argument("--queued", type=int, default=1000, help="requests waiting in the queue (default 1000)")
    ap.add_argument("--ops", type=int, default=2000, help="timed calls per operation (default 2000)")
    ap.add_argument(
        "--running", type=int, default=None, metavar="N",
        help="also measure saber with N requests running (key \"running\"; default: off)",
    )
    args = ap.parse_args(argv)
    if args.queued < 1 or args.ops < 1:
        ap.error("--queued and --ops must be positive")
    if args.running is not None and not 1 <= args.running <= 4000:
        ap.error("--running must be between 1 and 4000")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "budget_ns": BUDGET_NS,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "policies": {name: measure(name, args.queued, args.ops) for name in ("static", "saber-paper", "saber")},
        "speed_model_refit": measure_refit(),
    }
    if args.running is not None:
        report["running"] = measure_running(args.running, args.queued, args.ops)
    path = out / "policy_perf.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'policy':<12} {'op':<9} {'mean µs':>8} {'p50 µs':>8} {'p99 µs':>8} {'max µs':>8}  queued/running")
    worst = 0.0
    for name, res in report["policies"].items():
        for op in ("submit", "finished", "wake"):
            if op not in res:
                continue
            s = res[op]
            worst = max(worst, s["mean_ns"])
            print(
                f"{name:<12} {op:<9} {s['mean_ns'] / 1e3:>8.2f} {s['median_ns'] / 1e3:>8.2f} "
                f"{s['p99_ns'] / 1e3:>8.2f} {s['max_ns'] / 1e3:>8.2f}  {res['queued']}/{res['running_at_start']}"
            )
    if "running" in report:
        run = report["running"]
        for setting in ("tight", "closed_loop"):
            res = run[setting]
            for op in ("submit", "finished", "wake"):
                if op not in res:
                    continue
                s = res[op]
                print(
                    f"{'saber ' + setting:<18} {op:<9} {s['mean_ns'] / 1e3:>8.2f} {s['median_ns'] / 1e3:>8.2f} "
                    f"{s['p99_ns'] / 1e3:>8.2f} {s['max_ns'] / 1e3:>8.2f}  {res['queued']}/{res['running_at_start']}"
                )
    r = report["speed_model_refit"]
    print(f"speed model refit (512 samples, not a decision): mean {r['mean_ns'] / 1e6:.2f} ms, p50 "
          f"{r['median_ns'] / 1e6:.2f} ms")
    verdict = "within" if worst <= BUDGET_NS else "OVER"
    print(f"worst mean {worst / 1e3:.2f} µs: {verdict} the {BUDGET_NS / 1e3:.0f} µs budget; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
