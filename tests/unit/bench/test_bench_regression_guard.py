"""Regression guard: a small deterministic sim grid (virtual time, seed 0) where saber must stay at
or above best static - 1 point and at or above saber-paper.

Cells: a paper cell; a code-trace cell with hidden output lengths (the client sends the cap, the
engine stops at the trace's length); and engines whose speed differs from the gate's prior (the
paper profile): one 25% slower to decode with twice the prefill cost, one 30% faster with half, and
the robustness suite's flat engine (step time independent of the batch).
"""

from __future__ import annotations

import json

from saber_bench import robustness
from saber_bench.grid import RunKey, run_one
from saber_bench.policies import STATIC_CAPS
from saber_bench.trace_bench import TraceSource, rates_for, run_trace_one
from saber_emulator.profile import load_profile

POLICIES = (*(f"static-{n}" for n in STATIC_CAPS), "saber-paper", "saber")
ALLOWANCE = 0.01


def _engine(tmp_path, name: str, decode_factor: float, prefill: float) -> str:
    d = load_profile(None).model_dump()
    d.update(name=name, prefill_s_per_token=prefill, decode_step_s=[x * decode_factor for x in d["decode_step_s"]],
             description=f"the paper profile with decode steps x{decode_factor} and prefill {prefill} s/token")
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(d))
    return str(path)


def _check(goodput: dict[str, float]) -> None:
    statics = {p: g for p, g in goodput.items() if p.startswith("static-")}
    best = max(statics, key=statics.get)
    saber, paper = goodput["saber"], goodput["saber-paper"]
    assert saber >= statics[best] - ALLOWANCE, f"saber {saber:.3f} < best static {best} {statics[best]:.3f} - 1 pt"
    assert saber >= paper, f"saber {saber:.3f} < saber-paper {paper:.3f}"


def test_paper_cell_w1_at_5():
    _check({p: run_one(RunKey("W1", 5.0, p, 0)).stats.goodput for p in POLICIES})


def test_code_trace_hidden_lengths_at_1x_capacity():
    src = TraceSource(count=300)
    (rate,), _ = rates_for(src, None, None, [1.0])
    _check({p: run_trace_one(src, RunKey(src.label, rate, p, 0)).stats.goodput for p in POLICIES})


def test_slower_engine_than_the_prior_w3_at_3(tmp_path):
    prof = _engine(tmp_path, "slow", 1.25, 1e-4)
    _check({p: run_one(RunKey("W3", 3.0, p, 0), profile=prof).stats.goodput for p in POLICIES})


def test_faster_engine_than_the_prior_w1_at_10(tmp_path):
    prof = _engine(tmp_path, "fast", 0.7, 2.5e-5)
    _check({p: run_one(RunKey("W1", 10.0, p, 0), profile=prof).stats.goodput for p in POLICIES})


def test_flat_engine_w1_at_its_middle_rate():
    # The gate must learn that bigger batches cost nothing here (saber 74% against static-100's 93%
    # before the engine model believed a peak inside its own data).
    rate = round(robustness.BASE_RATES[1] / robustness.slowdown("flat", "W1"), 2)
    _check({p: robustness.run_one(robustness.Key("flat", "W1", rate, p, 0))[1].goodput
            for p in robustness.POLICIES})
