"""saber's batch plan and online estimates, against straightforward reference versions.

The plan is the one O(n) part of a decision, so it is written for speed: one lean pass for the
common candidate (done after the whole batch), per-request lists only when a candidate finishes
inside the batch, candidates priced once per shape. The estimates keep sorted windows instead of
sorting on every recompute. None of that may change a decision, so these tests compare them,
exactly (floats to the bit), with the per-position version the policy used before and with sorts.
"""

import math
import random

import pytest

from saber_sidecar.config import paper_config
from saber_sidecar.policy import Admit, request_for
from saber_sidecar.policy.estimates import OutputEstimate
from saber_sidecar.policy.saber import FITS, HURTS_BATCH, INF, MISSES_OWN, SaberPolicy
from saber_sidecar.policy.saber_replay import FeasibilityCheck, Fit, Verdict
from saber_sidecar.policy.saber_tuning import Tuning

TASKS = (("qna", 51), ("summary", 48), ("generation", 387), ("translation", 617))


def reference_fits(pol, now, expected, deadline, tpot_speed, prompt=0, span=0.0, cold=False):
    """(verdict, thin) as `fits` decides them with the full per-position plan, rebuilt here."""
    check, batch = pol.check, pol.batch
    table = pol.model.table
    h = check.headroom
    inv = [h / v for v in table]
    ks, dues, W, n, tol = list(batch.ks), list(batch.dues), batch.W, len(batch.ks), check.at_risk
    a0s, a1s, lenient, prefix = [], [], [], [INF]
    a0 = a1 = prev = 0.0
    least = INF
    for k, due, w0, w1 in zip(ks, dues, inv[n:0:-1], inv[n + 1 : 1 : -1]):
        r = max(k - W, 1.0)
        d = r - prev
        a0 += d * w0
        a1 += d * w1
        prev = r
        a0s.append(a0)
        a1s.append(a1)
        s = due - now - a0
        lenient.append(s if s >= tol * a0 else INF)
        if s >= 0.0 and s - a1 + a0 < least:
            least = s - a1 + a0
        prefix.append(least)
    max_tpot = max((r.tpot_speed for r in batch.running.values()), default=0.0)
    light = check.plan(now).light  # the same cached load reading the policy's plan takes
    if n + 2 >= len(table) or n >= pol.engine.cap or max_tpot * h > table[n + 1]:
        return HURTS_BATCH, None
    if tpot_speed * h > table[n + 1]:
        return MISSES_OWN, None
    if cold:
        slot = n + 1 + check.reserve
        if slot >= len(table) or table[slot] < pol.load.fresh_need * h:
            return HURTS_BATCH, None
    pos = next((j for j in range(n) if max(ks[j] - W, 1.0) >= expected), n)
    if pos:
        r_prev = max(ks[pos - 1] - W, 1.0)
        before0, before1 = a0s[pos - 1], a1s[pos - 1]
    else:
        before0 = before1 = r_prev = 0.0
    stall = pol.engine.per_token * prompt
    finish = before1 + (expected - r_prev) * h / table[n + 1 - pos] + stall
    reserve = check.reserve_share * (deadline - now if deadline is not None else span)
    thin = False
    if deadline is not None:
        own = deadline - check.margin - reserve - now - finish - batch.prefill_ahead(now)
        if own < 0.0 and not cold:
            return MISSES_OWN, None
        thin = cold or (light and own < check.at_risk * finish)
    if prefix[pos] < stall + (0.0 if light else reserve):
        return HURTS_BATCH, None
    if pos < n:
        delay = finish - (before0 + (expected - r_prev) * h / table[n - pos])
        if min(lenient[pos:]) < delay + reserve:
            return HURTS_BATCH, None
    return FITS, thin


def busy_policy(seed, steps=260, **tuning):
    """A saber policy run through random paper traffic; yields (policy, now) between events."""
    cfg = paper_config("saber", max_queue=400)
    # The plan's arithmetic on a fixed curve: no learning, so no slow-start cap either.
    cfg.scheduling.speed_model.online_refit = False
    pol = SaberPolicy(cfg, Tuning(**tuning))
    rng = random.Random(seed)
    now, running = 0.0, []
    for i in range(steps):
        now += rng.expovariate(40.0)
        if running and rng.random() < 0.45:
            acts = pol.finished(running.pop(rng.randrange(len(running))), now, rng.randint(20, 600), None)
        else:
            name, mt = rng.choice(TASKS)
            acts = pol.submit(request_for(cfg, name, f"r{i}", now, mt, prompt_tokens=rng.choice((0, 300, 2000))), now)
        running += [a.request_id for a in acts if isinstance(a, Admit)]
        if pol.next_wake() is not None and pol.next_wake() <= now:
            running += [a.request_id for a in pol.wake(now) if isinstance(a, Admit)]
        if i % 5 == 0 and pol.batch.running:
            yield pol, now, rng


@pytest.mark.parametrize("seed, tuning", [(1, {}), (2, {"light_load": 0.0}), (3, {"light_load": 10.0}),
                                         (4, {"slack_reserve_share": 0.0, "at_risk_slack_share": 0.3})])
def test_fits_matches_the_per_position_plan(seed, tuning):
    checked = {FITS: 0, HURTS_BATCH: 0, MISSES_OWN: 0}
    for pol, now, rng in busy_policy(seed, **tuning):
        check = pol.check
        plans = {"lean": check.plan(now)}
        for _ in range(12):
            expected = rng.choice((1, 2, rng.randint(1, 700), 51, 387))
            deadline = None if rng.random() < 0.2 else now + rng.uniform(-0.5, 14.0)
            args = (expected, deadline, rng.choice((0.0, 0.0, 20.0, 120.0)), rng.choice((0, 300, 2000)),
                    rng.uniform(1, 12), rng.random() < 0.2)
            want = reference_fits(pol, now, *args)
            # A fresh plan (bounds first, the replay on need), plans with the replay or the
            # per-request lists done up front, and the first plan again with shapes already priced.
            looped, listed = check.plan(now), check.plan(now)
            check.plan_loop(looped)
            check.plan_lists(listed)
            for plan in (plans["lean"], looped, listed, plans["lean"]):
                fit = check.fits(plan, *args)
                assert isinstance(fit, Fit) and isinstance(fit.verdict, Verdict)
                verdict, thin = fit
                assert (verdict, thin if verdict is FITS else None) == want
            checked[want[0]] += 1
    assert min(checked.values()) > 20, checked  # every verdict was exercised


def loose_policy(seed, running=200):
    """A saber policy with a large batch of one-hour requests of mixed lengths, some admitted
    unprotected (INF deadlines), the clock moved on between admissions."""
    from saber_sidecar.config import SchedulingConfig, SidecarConfig, SLAClass

    cfg = SidecarConfig(
        classes=[SLAClass(name="hour", deadline_seconds=3600.0), SLAClass(name="minute", deadline_seconds=60.0)],
        default_class="hour",
        scheduling=SchedulingConfig(policy="saber", max_queue=10_000),
    )
    cfg.scheduling.speed_model.online_refit = False  # a fixed curve: no slow-start cap
    pol = SaberPolicy(cfg)
    rng = random.Random(seed)
    now = 0.0
    for i in range(running):
        now += rng.expovariate(50.0)
        name = "minute" if rng.random() < 0.1 else "hour"
        pol.submit(request_for(cfg, name, f"r{i}", now, rng.randint(16, 2000), prompt_tokens=rng.choice((0, 80))), now)
    return pol, now, rng


def test_bounds_verdicts_are_the_replays():
    """Where `fits_by_bounds` settles a candidate, the full replay reaches the same verdict (and
    the same thin flag); on a large loose batch it settles most, on the paper's traffic few."""
    settled = {"loose": 0, "paper": 0}
    tried = {"loose": 0, "paper": 0}
    states = [("loose", *loose_policy(seed)) for seed in range(3)]
    states += [("paper", pol, now, rng) for seed in (1, 3) for pol, now, rng in busy_policy(seed)]
    for kind, pol, now, rng in states:
        outcomes = []

        def bounds(*args, check=pol.check, outcomes=outcomes):
            outcomes.append(FeasibilityCheck.fits_by_bounds(check, *args))
            return outcomes[-1]

        pol.check.fits_by_bounds = bounds
        for _ in range(40 if kind == "loose" else 12):
            expected = rng.choice((1, 2, rng.randint(1, 3000), 51, 387))
            horizon = 4000.0 if kind == "loose" else 14.0
            deadline = None if rng.random() < 0.2 else now + rng.uniform(-0.5, horizon)
            args = (expected, deadline, rng.choice((0.0, 0.0, 20.0)), rng.choice((0, 300, 2000)),
                    rng.uniform(1, 12), rng.random() < 0.2)
            want = reference_fits(pol, now, *args)
            outcomes.clear()
            pol.check.bounds_skipped = 10**9  # try the bounds whatever their recent record
            fit = pol.check.fits(pol.check.plan(now), *args)  # a fresh plan: bounds first
            assert (fit.verdict, fit.thin if fit.verdict is FITS else None) == want
            if outcomes:
                tried[kind] += 1
                if outcomes[0] is not None:
                    settled[kind] += 1
                    assert outcomes[0] == fit
    assert settled["loose"] > 0.5 * tried["loose"], (settled, tried)
    assert settled["paper"] > 0, (settled, tried)


def test_bounds_at_the_verdicts_edge():
    """Deadlines within ulps of where the replay's verdict flips: the bounds must leave those to
    the replay (or agree with it)."""
    for seed in range(3):
        pol, now, rng = loose_policy(seed)
        for _ in range(8):
            expected, prompt = rng.randint(1, 3000), rng.choice((0, 80))
            lo, hi = now, now + 8000.0  # the verdict at lo is not FITS, at hi it is
            assert reference_fits(pol, now, expected, hi, 0.0, prompt)[0] is FITS
            for _ in range(200):
                mid = (lo + hi) / 2
                if mid in (lo, hi):
                    break
                if reference_fits(pol, now, expected, mid, 0.0, prompt)[0] is FITS:
                    hi = mid
                else:
                    lo = mid
            for deadline in (lo, hi, math.nextafter(lo, -INF), math.nextafter(hi, INF), hi + 1e-9 * hi, hi + 1e-6 * hi):
                want = reference_fits(pol, now, expected, deadline, 0.0, prompt)
                pol.check.bounds_skipped = 10**9
                fit = pol.check.fits(pol.check.plan(now), expected, deadline, 0.0, prompt)
                assert (fit.verdict, fit.thin if fit.verdict is FITS else None) == want


def test_lean_plan_ends_are_the_lists_to_the_bit():
    for pol, now, _ in busy_policy(5):
        lean, full = pol.check.plan(now), pol.check.plan(now)
        assert not lean.looped and lean.a0 is None
        pol.check.plan_loop(lean)
        pol.check.plan_lists(full)
        assert full.a0 is not None and lean.a0 is None
        assert (lean.a0_end, lean.a1_end, lean.r_end, lean.least) == (full.a0[-1], full.a1[-1], full.r_end,
                                                                     full.prefix_min[-1])


@pytest.mark.parametrize("window, quantile, min_samples", [(8, 0.9, 8), (16, 0.5, 4), (256, 0.9, 8)])
def test_output_estimate_is_the_sorted_window_quantile(window, quantile, min_samples):
    rng = random.Random(window)
    est = OutputEstimate(window, quantile, min_samples)
    recent, since, value = [], 0, None
    for _ in range(2000):
        tokens = rng.choice((rng.randint(1, 600), 48, 48))  # ties, as real lengths have
        recent = (recent + [tokens])[-window:]
        since += 1
        changed = est.add(tokens)
        if len(recent) >= min_samples and (value is None or since >= 8):
            ordered = sorted(recent)
            new = max(1, ordered[max(0, math.ceil(quantile * len(ordered)) - 1)])
            assert changed == (new != value)
            since, value = 0, new
        else:
            assert not changed
        assert est.value == value
