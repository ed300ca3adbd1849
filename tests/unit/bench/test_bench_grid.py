import math

import pytest

from saber_bench.grid import SUITES, RunKey, RunOutput, expand, summarize
from saber_bench.metrics import RequestRecord, run_stats


def output(workload, rate, policy, seed, met, n=10, late=2.0):
    """A run in which `met` of n requests finish within SLA and the rest take `late` x SLA."""
    records = []
    for i in range(n):
        finish = 0.5 if i < met else late
        records.append(RequestRecord(f"r{i}", "qna", 0.0, 1.0, first_token_at=0.1, finished_at=finish, output_tokens=5))
    return RunOutput(RunKey(workload, rate, policy, seed), run_stats(records), 0.01)


def test_paper_suite_is_the_papers_grid():
    keys = expand(SUITES["paper"], seeds=3)
    assert len({k.rate for k in keys}) == 12
    assert {f"static-{n}" for n in range(10, 101, 10)} | {"saber-paper", "saber"} <= {k.policy for k in keys}
    assert len([k for k in keys if k.policy != "saber-oracle"]) == 3 * 12 * 12 * 3


def test_expand_checks_its_input():
    with pytest.raises(ValueError, match="unknown workload"):
        expand(SUITES["paper"], 1, workloads=["W7"])
    with pytest.raises(ValueError, match="unknown policy"):
        expand(SUITES["paper"], 1, policies=["static-0"])
    with pytest.raises(ValueError, match="seeds"):
        expand(SUITES["paper"], 0)


def test_summary_best_static_gain_cv_and_targets():
    outs = []
    for rate, (s10, s20, saber) in {1: (10, 10, 10), 5: (4, 8, 9)}.items():
        for seed in range(2):
            outs.append(output("W1", rate, "static-10", seed, s10))
            outs.append(output("W1", rate, "static-20", seed, s20))
            outs.append(output("W1", rate, "saber", seed, saber))
            outs.append(output("W1", rate, "saber-paper", seed, saber - 1))
    bounds = {("W1", 1.0, 0): 1.0, ("W1", 1.0, 1): 1.0, ("W1", 5.0, 0): 0.9, ("W1", 5.0, 1): 1.0}
    summary = summarize(outs, bounds)
    cells = {(c["rate"], c["policy"]): c for c in summary["cells"]}
    assert cells[(5, "saber")]["goodput"] == pytest.approx(0.9)
    assert cells[(5, "saber")]["seeds"] == 2
    assert cells[(5, "capacity-bound")]["goodput"] == pytest.approx(0.95)
    best = {b["rate"]: b for b in summary["best_static"]}
    assert best[1]["policy"] == "static-10"  # tie goes to the smaller cap
    assert best[5]["policy"] == "static-20"
    assert best[5]["saber_minus_best_static"] == pytest.approx(0.1)
    t = summary["targets"]["workloads"]["W1"]
    assert t["mean_gain_points"] == pytest.approx(5.0)
    assert t["mean_gain_met"] is False  # the paper's W1 gain is +10.2
    assert t["saber_ge_best_static_every_cell"] and t["saber_ge_saber_paper_every_cell"]
    cv = summary["cv"]["W1"]
    # saber's per-rate mean e2e/SLA: 0.5 at rate 1, 0.9*0.5+0.1*2 = 0.65 at rate 5.
    assert cv["saber"] == pytest.approx(0.075 / 0.575)
    assert not math.isnan(cv["best-static"])
