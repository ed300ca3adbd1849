from saber_bench.bound import _moore_hodgson, capacity_bound, engine_seconds
from saber_bench.workloads import RequestSpec, make_workload
from saber_emulator.engine import EngineConfig
from saber_emulator.profile import load_profile


def spec(i, arrival, sla, tokens, prompt=100):
    return RequestSpec(f"r{i}", "c", arrival, sla, "x", prompt, tokens, tokens)


def test_moore_hodgson_drops_the_fewest_jobs():
    # Unit jobs due at 1, 2, 2 and a long one due at 3: only two of them fit by their dates.
    assert _moore_hodgson([(1, 1), (2, 1), (2, 1), (3, 2)], 0.0) == 2
    assert _moore_hodgson([(1, 1), (2, 1), (4, 2)], 0.0) == 3
    assert _moore_hodgson([(1, 1), (2, 1), (4, 2)], 1.0) == 2  # starting later loses one
    assert _moore_hodgson([(5, 1), (5, 1)], 0.0) == 2
    assert _moore_hodgson([(1, 2)], 0.0) == 0


def test_request_too_slow_even_alone_is_never_counted():
    profile = load_profile(None)
    # 500 tokens in 1 s needs 500 tok/s; one request decodes at ~95 tok/s.
    assert engine_seconds(spec(0, 0, 1.0, 500), profile, 256) is None
    assert capacity_bound([spec(0, 0, 1.0, 500)], profile, EngineConfig()) == 0.0


def test_light_load_is_fully_feasible_and_overload_is_not():
    profile = load_profile(None)
    light = [spec(i, 10.0 * i, 8.0, 387) for i in range(5)]
    assert capacity_bound(light, profile, EngineConfig()) == 1.0
    # 300 generation requests at once: about 0.16 engine-s each, far beyond an 8 s window.
    heavy = [spec(i, 0.0, 8.0, 387) for i in range(300)]
    bound = capacity_bound(heavy, profile, EngineConfig())
    assert 0.0 < bound < 0.5


def test_bound_never_below_what_a_real_policy_reaches():
    from saber_bench.grid import RunKey, run_one

    profile = load_profile(None)
    for rate in (10, 20):
        specs = make_workload("W1", rate, 0)
        bound = capacity_bound(specs, profile, EngineConfig())
        for policy in ("static-20", "saber"):
            assert run_one(RunKey("W1", rate, policy, 0)).stats.goodput <= bound + 1e-9
