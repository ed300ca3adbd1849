"""The profile's per-request costs (request_overhead_s, request_step_s, request_step_s_per_seq) in the engine model and the simulator."""

import pytest
import yaml

from saber_bench.policies import build_policy, config_for_workload, request_builder
from saber_bench.sim import simulate
from saber_bench.workloads import PAPER_TASKS, RequestSpec
from saber_emulator.engine import EngineConfig, EngineCore, EngineRequest
from saber_emulator.profile import LatencyProfile, load_profile


def profile(**kw) -> LatencyProfile:
    return LatencyProfile(name="t", decode_batch_sizes=[1, 8], decode_step_s=[0.01, 0.02],
                          prefill_s_per_token=1e-4, **kw)


def test_defaults_leave_the_paper_profile_and_its_yaml_unchanged():
    paper = load_profile(None)
    assert paper.request_overhead_s == 0.0 and paper.request_step_s == 0.0
    assert paper.step_time(4, 100, 1000, new_requests=3) == paper.step_time(4, 100, 1000)
    text = profile().to_yaml()
    assert "request_" not in text  # old files and new ones without the costs read alike
    assert "request_step_s: 0.002" in profile(request_step_s=0.002).to_yaml()
    assert LatencyProfile.model_validate(yaml.safe_load(profile(request_overhead_s=0.01).to_yaml())).request_overhead_s == 0.01


def test_bounds_are_checked():
    with pytest.raises(ValueError):
        profile(request_overhead_s=-0.1)
    with pytest.raises(ValueError):
        profile(request_step_s=2.0)


def test_each_request_entering_the_batch_adds_request_step_s_once():
    e = EngineCore(EngineConfig(), profile(request_step_s=0.005))
    e.add_request(EngineRequest("a", 10, 3))
    e.add_request(EngineRequest("b", 20, 3))
    first = e.step(0.0)
    assert first.duration == pytest.approx(0.01 + 30 * 1e-4 + 2 * 0.005)
    second = e.step(first.end)  # both decode now: no newcomer, no extra
    assert second.duration == pytest.approx(profile().step_time(2, 0, second.context_tokens))


def test_a_join_costs_request_step_s_per_seq_for_each_sequence_decoding_in_its_step():
    e = EngineCore(EngineConfig(), profile(request_step_s_per_seq=0.001))
    e.add_request(EngineRequest("a", 10, 8))
    e.add_request(EngineRequest("b", 10, 8))
    first = e.step(0.0)  # both prefill: nobody decodes, the join costs nothing per sequence
    assert first.duration == pytest.approx(0.01 + 20 * 1e-4)
    e.add_request(EngineRequest("c", 10, 8))
    joined = e.step(first.end)  # c joins a step in which a and b decode: 2 x 1 ms
    assert joined.duration == pytest.approx(profile().step_time(2, 10, joined.context_tokens) + 2 * 0.001)
    assert "request_step_s_per_seq: 0.001" in profile(request_step_s_per_seq=0.001).to_yaml()
    with pytest.raises(ValueError):
        profile(request_step_s_per_seq=0.5)


def test_a_request_waits_out_the_fixed_overhead_before_its_first_step():
    e = EngineCore(EngineConfig(), profile(request_overhead_s=0.05))
    e.add_request(EngineRequest("a", 10, 2, arrival_time=1.0))
    assert e.step(1.0) is None and e.has_work
    assert e.next_ready_time() == pytest.approx(1.05)
    out = e.step(1.05)
    assert out.first_token == ["a"] and out.ttfts == [pytest.approx(0.05 + 0.01 + 10 * 1e-4)]


def test_a_preempted_request_does_not_pay_the_overhead_again():
    cfg = EngineConfig(num_gpu_blocks=3, block_size=4, max_model_len=12)
    e = EngineCore(cfg, profile(request_overhead_s=0.05))
    e.add_request(EngineRequest("a", 4, 8, arrival_time=0.0))
    e.add_request(EngineRequest("b", 4, 8, arrival_time=0.0))
    t, preempted = 0.05, False
    while e.has_work:
        out = e.step(t)
        assert out is not None  # nothing waits on the overhead after its first step
        preempted |= bool(out.preempted)
        t = out.end
    assert preempted


def test_the_simulator_steps_when_the_overhead_has_passed():
    t = PAPER_TASKS["generation"]
    s = RequestSpec("r0", "generation", 1.0, t.sla_s, "p" * t.prompt_chars, t.prompt_chars // 4, 8, 8)
    base = load_profile(None)
    slow = base.model_copy(update={"request_overhead_s": 0.2, "request_step_s": 0.01})
    config = config_for_workload("static-10", "W1")
    recs = []
    for p in (base, slow):
        res = simulate([s], build_policy("static-10", config, 0), EngineCore(EngineConfig(), p), request_builder("static-10", config))
        recs.append(res.records[0])
    assert recs[1].ttft == pytest.approx(recs[0].ttft + 0.2 + 0.01)
    assert recs[1].e2e == pytest.approx(recs[0].e2e + 0.2 + 0.01)
