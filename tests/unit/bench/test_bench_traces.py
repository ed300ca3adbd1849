"""Trace parsers (on small files written here, one per format), windows, scaling, class rules,
synthesized prompts, the shipped synthetic code trace, and the hidden-length guarantee."""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace

import numpy as np
import pytest

from saber_bench.policies import request_builder
from saber_bench.sim import default_engine, simulate
from saber_bench.trace_bench import TraceSource, capacity_rps
from saber_bench.traces import (
    SYNTHETIC_CODE_TRACE,
    ClassRule,
    TraceError,
    TraceRow,
    detect_format,
    mean_rate,
    read_trace,
    scale,
    synth_prompt,
    to_specs,
    window,
)
from saber_bench.workloads import approx_tokens
from saber_sidecar.policy import make_policy
from saber_sidecar.policy.base import Request


@pytest.fixture
def azure(tmp_path):
    p = tmp_path / "AzureLLMInferenceTrace_code.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:15:46.6805900,374,44\n"
                 "2023-11-16 18:15:50.9951690,396,109\n"
                 "2023-11-16 18:15:45.1000000,879,20\n")
    return p


@pytest.fixture
def burstgpt(tmp_path):
    p = tmp_path / "BurstGPT_1.csv"
    p.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "5,ChatGPT,472,18,490,Conversation log\n"
                 "45,ChatGPT,1087,0,1087,Conversation log\n"
                 "118,GPT-4,417,276,693,API log\n")
    return p


@pytest.fixture
def mooncake(tmp_path):
    p = tmp_path / "mooncake_trace.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"timestamp": 0, "input_length": 6755, "output_length": 500, "hash_ids": [0, 1]},
        {"timestamp": 3052, "input_length": 2287, "output_length": 316, "hash_ids": [0, 2]},
        {"timestamp": 1500, "input_length": 100, "output_length": 7, "hash_ids": [3]},
    ]) + "\n")
    return p


def test_formats_are_detected_from_the_header(azure, burstgpt, mooncake):
    assert (detect_format(azure), detect_format(burstgpt), detect_format(mooncake)) == ("azure", "burstgpt", "mooncake")


def test_azure_rows_sorted_relative_with_sub_second_times(azure):
    rows = read_trace(azure)
    assert [(r.prompt_tokens, r.output_tokens) for r in rows] == [(879, 20), (374, 44), (396, 109)]
    assert rows[0].t == 0.0
    assert rows[1].t == pytest.approx(1.58059, abs=1e-5)
    assert rows[2].t == pytest.approx(5.895169, abs=1e-5)


def test_burstgpt_drops_failed_requests_and_keeps_columns(burstgpt):
    rows = read_trace(burstgpt)
    assert [(r.t, r.prompt_tokens, r.output_tokens) for r in rows] == [(0.0, 472, 18), (113.0, 417, 276)]
    assert rows[1].columns["Model"] == "GPT-4"


def test_mooncake_timestamps_are_milliseconds(mooncake):
    rows = read_trace(mooncake)
    assert [(r.t, r.prompt_tokens, r.output_tokens) for r in rows] == [(0.0, 6755, 500), (1.5, 100, 7), (3.052, 2287, 316)]


def test_bad_input_gets_a_clear_error(tmp_path, azure):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(TraceError, match="cannot tell the format"):
        read_trace(bad)
    with pytest.raises(TraceError, match="missing column"):
        read_trace(bad, "burstgpt")
    broken = tmp_path / "broken.csv"
    broken.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,abc,4\n")
    with pytest.raises(TraceError, match=r"broken.csv:2: ContextTokens must be a number"):
        read_trace(broken)
    with pytest.raises(TraceError, match="not found"):
        read_trace(tmp_path / "missing.csv")


def test_window_and_scaling():
    rows = [TraceRow(float(t), 10, 5) for t in range(100)]
    w = window(rows, start=10, count=20)
    assert len(w) == 20 and w[0].t == 0.0 and w[-1].t == 19.0
    assert len(window(rows, start=50, duration=10)) == 10
    assert mean_rate(w) == pytest.approx(1.0)
    fast = scale(w, rate=4.0)
    assert mean_rate(fast) == pytest.approx(4.0)
    assert scale(w, speedup=2.0)[-1].t == pytest.approx(9.5)
    with pytest.raises(TraceError):
        window(rows, start=1000)


def test_class_rules_by_prompt_length_and_by_column():
    rule = ClassRule.parse("prompt_tokens:short@2048,long")
    assert rule.classify(TraceRow(0, 2048, 1), 256) == "short"
    assert rule.classify(TraceRow(0, 2049, 1), 256) == "long"
    by_model = ClassRule.parse("Model:GPT-4=premium,standard")
    assert by_model.classify(TraceRow(0, 1, 1, {"Model": "GPT-4"}), 256) == "premium"
    assert by_model.classify(TraceRow(0, 1, 1, {"Model": "ChatGPT"}), 256) == "standard"
    with pytest.raises(TraceError):
        ClassRule.parse("prompt_tokens:short@x,long")
    with pytest.raises(TraceError, match="neither"):
        ClassRule.parse("nope:a@1,b").classify(TraceRow(0, 1, 1), 256)


def test_synthesized_prompts_hit_the_token_count_and_differ():
    for n in (1, 13, 1500, 7000):
        assert approx_tokens(synth_prompt(n, salt=3)) == n
    assert synth_prompt(500, 1) != synth_prompt(500, 2)


def test_specs_send_the_cap_and_keep_the_true_length():
    rows = [TraceRow(0.0, 100, 13), TraceRow(1.0, 9000, 900)]
    specs = to_specs(rows, 256, None, "code", {"code": 2.0}, max_prompt_tokens=8000)
    assert [(s.max_tokens, s.output_tokens, s.prompt_tokens) for s in specs] == [(256, 13, 100), (256, 256, 8000)]


def test_shipped_synthetic_trace_has_the_published_shape():
    rows = read_trace(SYNTHETIC_CODE_TRACE)
    assert detect_format(SYNTHETIC_CODE_TRACE) == "azure" and len(rows) == 4000
    p = np.array([r.prompt_tokens for r in rows])
    o = np.array([r.output_tokens for r in rows])
    assert 1300 <= np.median(p) <= 1700 and 4300 <= np.percentile(p, 90) <= 5700
    assert 11 <= np.median(o) <= 15 and 45 <= np.percentile(o, 90) <= 65
    gaps = np.diff([r.t for r in rows])
    assert gaps.std() / gaps.mean() > 1.2  # bursty: a Poisson process would have 1.0


class _Spy:
    """Wraps a policy and keeps every Request it is given at submit."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def submit(self, req, now):
        self.seen.append(asdict(req))
        return self.inner.submit(req, now)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_the_gate_cannot_see_the_true_output_length():
    # The policy's Request has no field for the true length ...
    assert not {f.name for f in fields(Request)} & {"output_tokens", "true_output_tokens"}
    src = TraceSource(count=60)
    specs = src.specs(rate=2.0)
    other = [replace(s, output_tokens=1 if s.output_tokens > 1 else 2) for s in specs]
    for policy in ("static-20", "saber"):
        config = src.config(policy)
        build = request_builder(policy, config)
        # ... and what it is built from does not change when only the true length changes.
        assert [asdict(build(a, 0.0)) for a in specs] == [asdict(build(b, 0.0)) for b in other]
        # The whole run: under a static cap, decisions do not depend on what finishes when, so every
        # submitted Request is identical; the engine (which does see the length) differs.
        if policy == "static-20":
            runs = []
            for ss in (specs, other):
                spy = _Spy(make_policy(config, 0))
                res = simulate(ss, spy, default_engine(seed=0, max_model_len=8192), build)
                runs.append((spy.seen, [r.output_tokens for r in res.records]))
            assert runs[0][0] == runs[1][0]
            assert runs[0][1] == [s.output_tokens for s in specs] and runs[1][1] == [s.output_tokens for s in other]
    # The oracle reference is told the length, so the same check would catch a leak.
    oracle = request_builder("saber-oracle", src.config("saber-oracle"))
    assert [oracle(a, 0.0).expected_tokens for a in specs] != [oracle(b, 0.0).expected_tokens for b in other]


def test_capacity_is_prefill_dominated_for_the_code_trace():
    specs = TraceSource(count=1000).specs()
    cap = capacity_rps(specs)
    mean_prompt = sum(s.prompt_tokens for s in specs) / len(specs)
    assert 1 / cap > mean_prompt * 5e-5  # at least the prefill of the mean prompt
    assert 4 < cap < 15


def test_sla_file_is_the_deployed_config(tmp_path):
    sla = tmp_path / "sla.yaml"
    sla.write_text("classes:\n  - {name: short, deadline_seconds: 1.0, ttft_seconds: 0.5}\n"
                   "  - {name: long, deadline_seconds: 4.0, tpot_seconds: 0.1}\n"
                   "default_class: long\nscheduling: {policy: saber, saber: {shed_batch_fraction: 0.4}}\n")
    src = TraceSource(count=50, sla_path=str(sla), class_rule="prompt_tokens:short@1000,long")
    specs = src.specs()
    assert {s.sla_class for s in specs} == {"short", "long"}
    assert all((s.ttft_s, s.tpot_s, s.sla_s) == ((0.5, None, 1.0) if s.sla_class == "short" else (None, 0.1, 4.0))
               for s in specs)
    cfg = src.config("saber")
    assert cfg.scheduling.policy == "saber" and cfg.scheduling.saber.shed_batch_fraction == 0.4
    assert src.config("static-30").scheduling.static_max_concurrency == 30
    with pytest.raises(ValueError, match="not in the SLA config"):
        TraceSource(count=50, sla_path=str(sla), class_rule="prompt_tokens:tiny@10,long").check()
