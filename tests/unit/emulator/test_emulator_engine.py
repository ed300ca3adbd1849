"""The virtual-time engine: calibration fidelity, scheduling limits, preemption, abort, determinism."""

import pytest

from paper_data import PAPER_CSV as CSV
from saber_emulator.engine import EngineConfig, EngineCore, EngineRequest, OutputLengthConfig
from saber_emulator.profile import LatencyProfile, load_profile, read_speed_csv


def run(engine: EngineCore, t: float = 0.0, limit: int = 100_000):
    """Drive the engine to idle in virtual time; returns per-request token times and all results."""
    times: dict[str, list[float]] = {}
    steps = []
    while (out := engine.step(t)) is not None:
        t = out.end
        steps.append(out)
        for rid in out.new_tokens:
            times.setdefault(rid, []).append(t)
        assert len(steps) < limit
    return times, steps


def decode_speeds(times):
    return [(len(ts) - 1) / (ts[-1] - ts[0]) for ts in times.values()]


def test_virtual_time_speed_matches_the_calibration_curve_exactly():
    means = read_speed_csv(CSV)
    profile = load_profile(None)
    for L in range(1, 61):
        engine = EngineCore(EngineConfig(), profile, seed=1)
        for i in range(L):
            engine.add_request(EngineRequest(f"r{i}", prompt_tokens=100, max_tokens=50, ignore_eos=True))
        times, _ = run(engine)
        speeds = decode_speeds(times)
        assert len(speeds) == L
        expected = means.get(L, profile.speed(L))
        for s in speeds:
            assert s == pytest.approx(expected, rel=1e-9), L


def test_max_num_seqs_and_token_budget_hold_every_step():
    engine = EngineCore(EngineConfig(max_num_seqs=4, max_num_batched_tokens=64), load_profile(None), seed=3)
    for i in range(10):
        engine.add_request(EngineRequest(f"r{i}", prompt_tokens=150, max_tokens=20))
    max_running = 0
    t = 0.0
    while (out := engine.step(t)) is not None:
        t = out.end
        assert out.num_scheduled_tokens <= 64
        max_running = max(max_running, engine.num_running)
        assert engine.num_running <= 4
    assert max_running == 4
    assert engine.counters.finished["stop"] + engine.counters.finished["length"] == 10


def test_chunked_prefill_spreads_a_long_prompt_over_steps_and_costs_time():
    profile = LatencyProfile(name="t", decode_batch_sizes=[1], decode_step_s=[0.01], prefill_s_per_token=1e-4)
    engine = EngineCore(EngineConfig(max_num_batched_tokens=256), profile)
    engine.add_request(EngineRequest("long", prompt_tokens=1000, max_tokens=3, ignore_eos=True))
    _, steps = run(engine)
    prefill_steps = [s for s in steps if s.num_prefill_tokens]
    assert [s.num_prefill_tokens for s in prefill_steps] == [256, 256, 256, 232]
    assert steps[3].first_token == ["long"]
    assert steps[0].duration == pytest.approx(0.01 + 256 * 1e-4)
    assert len(steps) == 6  # 4 prefill chunks, then 2 decodes


def test_preemption_when_kv_blocks_run_out_is_counted_and_everyone_finishes():
    # 12 blocks of 16 tokens; 4 requests that each grow to 64 tokens need 16 blocks together.
    cfg = EngineConfig(num_gpu_blocks=12, block_size=16, max_model_len=128)
    engine = EngineCore(cfg, load_profile(None))
    for i in range(4):
        engine.add_request(EngineRequest(f"r{i}", prompt_tokens=16, max_tokens=48, ignore_eos=True))
    times, steps = run(engine)
    preempted = [rid for s in steps for rid in s.preempted]
    assert engine.counters.preemptions == len(preempted) > 0
    assert preempted[0] == "r3"  # fcfs preempts the newest running request
    assert {rid: len(ts) for rid, ts in times.items()} == {f"r{i}": 48 for i in range(4)}
    assert engine.kv_cache_usage == 0.0 and engine.num_running == 0


def test_preempted_request_returns_to_the_head_of_the_waiting_queue():
    cfg = EngineConfig(num_gpu_blocks=6, block_size=16, max_model_len=96, max_num_seqs=2)
    engine = EngineCore(cfg, load_profile(None))
    for i in range(3):
        engine.add_request(EngineRequest(f"r{i}", prompt_tokens=16, max_tokens=60, ignore_eos=True))
    t = 0.0
    while (out := engine.step(t)) is not None and not out.preempted:
        t = out.end
    assert out is not None and out.preempted == ["r1"]
    assert engine._waiting.peek().spec.id == "r1"


def test_priority_policy_admits_lower_priority_value_first():
    cfg = EngineConfig(scheduling_policy="priority", max_num_seqs=1)
    engine = EngineCore(cfg, load_profile(None))
    engine.add_request(EngineRequest("late-low", 10, 2, ignore_eos=True, priority=5, arrival_time=0.0))
    engine.add_request(EngineRequest("high", 10, 2, ignore_eos=True, priority=-1, arrival_time=1.0))
    _, steps = run(engine)
    assert steps[0].first_token == ["high"]


def test_abort_frees_slot_and_blocks_at_once():
    engine = EngineCore(EngineConfig(max_num_seqs=1), load_profile(None))
    engine.add_request(EngineRequest("a", 100, 50, ignore_eos=True))
    engine.add_request(EngineRequest("b", 100, 50, ignore_eos=True))
    out = engine.step(0.0)
    assert engine.num_running == 1 and engine.num_waiting == 1 and engine.kv_cache_usage > 0
    done = engine.abort("a", out.end)
    assert done is not None and done.reason == "abort"
    assert engine.num_running == 0 and engine.kv_cache_usage == 0.0
    assert engine.counters.finished["abort"] == 1
    nxt = engine.step(out.end)
    assert "b" in nxt.new_tokens  # the freed slot is used by the very next step
    assert engine.abort("a") is None
    engine.abort("b")
    assert engine.step(nxt.end) is None and not engine.has_work


def test_output_lengths_are_deterministic_for_a_seed_and_respect_bounds():
    def lengths(seed, **kw):
        e = EngineCore(EngineConfig(output_len=OutputLengthConfig(**kw)), load_profile(None), seed=seed)
        for i in range(50):
            e.add_request(EngineRequest(f"r{i}", 10, 100, min_tokens=30))
        return [e.output_length(f"r{i}") for i in range(50)]

    a, b, c = lengths(7), lengths(7), lengths(8)
    assert a == b and a != c
    assert all(50 <= n <= 100 for n in a)  # uniform, low_fraction 0.5
    assert all(30 <= n <= 100 for n in lengths(1, kind="lognormal", median_tokens=20))
    assert set(lengths(1, kind="max")) == {100}


def test_ignore_eos_and_explicit_lengths_finish_with_the_right_reason():
    engine = EngineCore(EngineConfig(), load_profile(None))
    engine.add_request(EngineRequest("eos", 10, 40, ignore_eos=True))
    engine.add_request(EngineRequest("short", 10, 40, output_tokens=7))
    _, steps = run(engine)
    reasons = {f.id: (f.reason, f.output_tokens) for s in steps for f in s.finished}
    assert reasons == {"eos": ("length", 40), "short": ("stop", 7)}


def test_same_seed_same_trace():
    def trace(seed):
        e = EngineCore(EngineConfig(max_num_seqs=8, num_gpu_blocks=40, max_model_len=400), load_profile(None), seed=seed)
        for i in range(30):
            e.add_request(EngineRequest(f"r{i}", 20 + 7 * i, 120, arrival_time=0.0))
        _, steps = run(e)
        return [(round(s.duration, 12), sorted(s.new_tokens), s.preempted) for s in steps]

    first = trace(5)
    assert first == trace(5)
    assert any(p for _, _, p in first)  # the small cache forces preemptions into the trace


def test_rejects_requests_it_could_never_serve():
    engine = EngineCore(EngineConfig(max_model_len=100), load_profile(None))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(EngineRequest("x", 90, 20))
    engine.add_request(EngineRequest("ok", 10, 20))
    with pytest.raises(ValueError, match="duplicate"):
        engine.add_request(EngineRequest("ok", 10, 20))
    with pytest.raises(ValueError, match="KV cache capacity"):
        EngineConfig(max_model_len=1000, num_gpu_blocks=10, block_size=16)


def test_idle_engine_returns_none():
    assert EngineCore(EngineConfig(), load_profile(None)).step(0.0) is None
