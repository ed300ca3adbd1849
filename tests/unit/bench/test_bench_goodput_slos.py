"""Goodput as the peers define it (TTFT, TPOT and e2e SLOs), honest best-static ties and CV
comparisons, and the emulator's hidden-length field."""

from __future__ import annotations

import math

import pytest

from saber_bench.metrics import RequestRecord, best_static_key, cv_comparison, run_stats
from saber_emulator.engine import EngineConfig, EngineCore, EngineRequest
from saber_emulator.profile import load_profile
from saber_emulator.protocol import (
    ProtocolContext,
    ProtocolError,
    TokenCounter,
    parse_completion,
)


def _rec(e2e=1.0, ttft=0.2, n=11, **kw) -> RequestRecord:
    return RequestRecord("r", "code", 0.0, 2.0, admitted_at=0.0, first_token_at=ttft, finished_at=e2e,
                         output_tokens=n, **kw)


def test_tpot_is_vllm_bench_serves():
    assert _rec(e2e=1.2, ttft=0.2, n=11).tpot == pytest.approx(0.1)
    assert _rec(e2e=0.3, ttft=0.3, n=1).tpot == 0.0


def test_a_request_is_good_only_within_every_slo_it_has():
    assert _rec().met
    assert not _rec(e2e=2.5).met and _rec(e2e=2.5).misses() == ("e2e",)
    assert _rec(ttft=0.9, ttft_slo_s=1.0).met
    assert _rec(ttft=1.1, ttft_slo_s=1.0).misses() == ("ttft",)
    assert _rec(e2e=1.2, ttft=0.2, n=11, tpot_slo_s=0.05).misses() == ("tpot",)
    assert RequestRecord("r", "code", 0.0, 2.0, rejected=True).misses() == ("rejected",)
    assert RequestRecord("r", "code", 0.0, 2.0).misses() == ("unfinished",)


def test_run_stats_count_each_kind_of_miss_and_per_class_attainment():
    recs = [_rec(), _rec(ttft=1.5, e2e=1.8, ttft_slo_s=1.0), _rec(e2e=3.0),
            RequestRecord("x", "other", 0.0, 1.0, rejected=True)]
    st = run_stats(recs)
    assert st.goodput == 0.25
    assert st.extra["miss_ttft"] == 1 and st.extra["miss_e2e"] == 1 and st.extra["miss_rejected"] == 1
    assert st.attainment == {"code": pytest.approx(1 / 3), "other": 0.0}


def test_best_static_ties_go_to_the_lower_latency():
    cells = [{"policy": "static-10", "goodput": 1.0, "mean_e2e_over_sla": 0.9},
             {"policy": "static-50", "goodput": 1.0, "mean_e2e_over_sla": 0.4},
             {"policy": "static-90", "goodput": 0.9, "mean_e2e_over_sla": 0.1}]
    assert max(cells, key=best_static_key)["policy"] == "static-50"
    same = [dict(c, mean_e2e_over_sla=0.5) for c in cells[:2]]
    assert max(same, key=best_static_key)["policy"] == "static-10"  # full tie: the smaller cap


def test_cv_is_compared_with_every_single_cap():
    out = cv_comparison({"static-10": 0.5, "static-20": 0.2, "best-static": 0.6, "saber": 0.25})
    assert out["cv_steadiest_cap"] == "static-20"
    assert out["cv_reduction_vs_cap"]["static-10"] == pytest.approx(0.5)
    assert out["cv_reduction_vs_steadiest_cap"] == pytest.approx(-0.25)  # saber is less steady than static-20
    assert math.isnan(cv_comparison({"saber": 0.3})["cv_reduction_vs_steadiest_cap"])


def _ctx() -> ProtocolContext:
    return ProtocolContext(["m"], 4096, TokenCounter())


def test_emulator_reads_the_hidden_length_from_vllm_xargs():
    p = parse_completion({"prompt": "x" * 40, "max_tokens": 256, "vllm_xargs": {"saber_output_tokens": 13}}, _ctx())
    assert (p.max_tokens, p.stop_at_tokens) == (256, 13)
    assert parse_completion({"prompt": "x", "max_tokens": 8, "vllm_xargs": {"saber_output_tokens": 50}},
                            _ctx()).stop_at_tokens == 8  # the cap still wins
    assert parse_completion({"prompt": "x", "max_tokens": 8, "vllm_xargs": {"other": "y"}}, _ctx()).stop_at_tokens is None
    for bad in ({"saber_output_tokens": 0}, {"saber_output_tokens": "3"}, "x"):
        with pytest.raises(ProtocolError, match="vllm_xargs"):
            parse_completion({"prompt": "x", "max_tokens": 8, "vllm_xargs": bad}, _ctx())


def test_engine_generates_exactly_the_hidden_length():
    eng = EngineCore(EngineConfig(), load_profile(None))
    eng.add_request(EngineRequest(id="a", prompt_tokens=100, max_tokens=256, output_tokens=13))
    now, done = 0.0, []
    while eng.has_work:
        step = eng.step(now)
        now = step.end
        done += step.finished
    assert [(f.id, f.output_tokens, f.reason) for f in done] == [("a", 13, "stop")]
