"""All three policies driven through whole workloads by a fluid engine model.

The engine here is a FAKE named as such: a fluid model in which every running request advances
at v(L) tokens/s (the paper's fitted curve). It is enough to check the driver contract (every
request gets exactly one Admit or Reject, demotions come first, nothing hangs) and to compare
policies on the paper's workloads; speed-accurate comparisons are the benchmark's job, with the
engine emulator.
"""

import math
import random

import pytest

from saber_sidecar.config import SidecarConfig, paper_config
from saber_sidecar.policy import Admit, Demote, Reject, make_policy, request_for


def paper_curve(L):
    return 102.55 / (1 + 0.0300 * L - 0.000146 * L * L)


PAPER_TASKS = {"qna": 51, "summary": 48, "generation": 387, "translation": 617}
HEAVY = {"generation": 40, "translation": 40, "qna": 10, "summary": 10}
BALANCED = {"generation": 25, "translation": 25, "qna": 25, "summary": 25}


def paper_workload(shares, rate, n=100, seed=0):
    """The paper's arrivals: n uniform times over n/rate seconds; outputs run to max_tokens."""
    rng = random.Random(seed)
    names = [t for t, s in shares.items() for _ in range(s)]
    times = sorted(rng.uniform(0, n / rate) for _ in range(n))
    return [(t, f"r{i}", cls, PAPER_TASKS[cls], PAPER_TASKS[cls]) for i, t in enumerate(times)
            for cls in [rng.choice(names)]]


def simulate(cfg, workload, seed=0, ttft=0.02):
    """Run a workload of (arrival, id, class, max_tokens, actual_tokens); return per-request outcomes."""
    pol = make_policy(cfg, seed=seed)
    info = {rid: {"cls": c, "arrival": t, "actual": act} for t, rid, c, mt, act in workload}
    arrivals = sorted(workload)
    running: dict[str, float] = {}
    decision: dict[str, str] = {}
    demoted_at: dict[str, float] = {}
    now, i = 0.0, 0

    def apply(actions):
        for a in actions:
            rid = a.request_id
            assert rid in info and rid not in decision, f"second decision for {rid}: {a}"
            if isinstance(a, Demote):
                assert rid not in demoted_at, f"demoted twice: {rid}"
                demoted_at[rid] = now
            elif isinstance(a, Admit):
                assert a.best_effort == (rid in demoted_at), f"best_effort flag wrong for {rid}"
                decision[rid] = "admit"
                running[rid] = float(info[rid]["actual"])
                info[rid]["admitted"] = now
            elif isinstance(a, Reject):
                assert a.retry_after_s > 0
                decision[rid] = "reject"

    for _ in range(1_000_000):
        L = len(running)
        v = paper_curve(L) if L else 0.0
        t_fin = now + min(running.values()) / v if L else math.inf
        t_arr = arrivals[i][0] if i < len(arrivals) else math.inf
        wake = pol.next_wake()
        t_wake = math.inf if wake is None else max(wake, now)
        t = min(t_fin, t_arr, t_wake)
        if t == math.inf:
            break
        for r in running:
            running[r] -= v * (t - now)
        now = t
        if t == t_fin:
            for rid in [r for r, left in running.items() if left <= 1e-6]:
                del running[rid]
                info[rid]["finished"] = now
                apply(pol.finished(rid, now, info[rid]["actual"], info[rid]["admitted"] + ttft))
        elif t == t_arr:
            ta, rid, cls, mt, _ = arrivals[i]
            i += 1
            apply(pol.submit(request_for(cfg, cls, rid, ta, mt), now))
        else:
            apply(pol.wake(now))
    else:
        pytest.fail("simulation did not finish")
    assert set(decision) == set(info), "a request never got Admit or Reject"
    assert not running and pol.next_wake() is None
    st = pol.stats()
    assert (st.running, st.queued_sla, st.queued_best_effort) == (0, 0, 0)
    return info, decision


def goodput(cfg, info):
    ok = sum(
        1 for d in info.values()
        if "finished" in d and d["finished"] - d["arrival"] <= cfg.get_class(d["cls"]).deadline_seconds + 1e-9
    )
    return ok / len(info)


@pytest.mark.parametrize("policy", ["static", "saber-paper", "saber"])
@pytest.mark.parametrize("shares, rate", [(HEAVY, 20), (BALANCED, 5)])
def test_every_request_is_decided_and_finishes(policy, shares, rate):
    cfg = paper_config(policy)
    info, decision = simulate(cfg, paper_workload(shares, rate))
    assert all("finished" in info[r] for r, d in decision.items() if d == "admit")


@pytest.mark.parametrize("policy", ["static", "saber-paper", "saber"])
def test_mixed_classes_random_traffic_keeps_the_contract(policy):
    """Reject and demote classes, TTFT and TPOT targets, outputs shorter than max_tokens."""
    cfg = SidecarConfig.model_validate(
        {
            "classes": [
                {"name": "chat", "deadline_seconds": 2, "ttft_seconds": 0.3, "on_miss": "reject"},
                {"name": "code", "deadline_seconds": 8, "output_tokens": 300},
                {"name": "stream", "deadline_seconds": 30, "tpot_seconds": 0.02},
                {"name": "batch", "deadline_seconds": 120},
            ],
            "default_class": "batch",
            "scheduling": {"policy": policy, "max_queue": 60, "static_max_concurrency": 24},
        }
    )
    rng = random.Random(7)
    wl, t = [], 0.0
    for n in range(400):
        t += rng.expovariate(12.0)
        cls = rng.choice(["chat", "code", "stream", "batch"])
        mt = {"chat": 80, "code": 400, "stream": 600, "batch": 1500}[cls]
        wl.append((t, f"m{n}", cls, mt, rng.randint(1, mt)))
    info, decision = simulate(cfg, wl, seed=3)
    assert "admit" in decision.values()


def test_saber_beats_the_paper_and_a_static_cap_on_heavy_load():
    """The paper's heavy and balanced mixes at 10 and 20 req/s, three seeds each."""
    totals = {"static": 0.0, "saber-paper": 0.0, "saber": 0.0}
    for shares in (HEAVY, BALANCED):
        for rate in (10, 20):
            for seed in range(3):
                wl = paper_workload(shares, rate, seed=seed)
                for policy in totals:
                    cfg = paper_config(policy)
                    totals[policy] += goodput(cfg, simulate(cfg, wl)[0]) / 12
    assert totals["saber"] > totals["saber-paper"] + 0.1, totals
    assert totals["saber"] > totals["static"] + 0.1, totals
