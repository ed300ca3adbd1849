"""Pure parts of `saber calibrate`, the YAML profile format, the real-vLLM proof's workload and configs."""

import numpy as np
import pytest
import yaml

from saber_bench.calibrate import (
    MAX_PROFILE_BYTES,
    Sample,
    _build,
    _Stream,
    default_concurrencies,
    window_speeds,
    write_outputs,
)
from saber_emulator.profile import LatencyProfile, load_profile


def test_profile_round_trips_through_yaml_and_json(tmp_path):
    p = load_profile(None)
    for name in ("p.yaml", "p.yml", "p.json"):
        p.save(tmp_path / name)
        assert load_profile(str(tmp_path / name)) == p
    assert (tmp_path / "p.yaml").read_text().startswith("name: paper-qwen2.5-coder-3b\n")


def test_bad_yaml_profile_fails_with_the_file_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="bad.yaml: expected a mapping"):
        load_profile(str(bad))
    bad.write_text("name: x\ndecode_batch_sizes: [1, 2]\ndecode_step_s: [0.02, 0.01]\n")
    with pytest.raises(ValueError, match="non-decreasing"):
        load_profile(str(bad))


def test_default_concurrencies_are_powers_of_two_up_to_the_cap():
    assert default_concurrencies(64) == [1, 2, 4, 8, 16, 32, 64]
    assert default_concurrencies(48) == [1, 2, 4, 8, 16, 32, 48]
    assert default_concurrencies(1) == [1]
    with pytest.raises(ValueError):
        default_concurrencies(0)


def _steady(start: float, n_tokens: int, step: float) -> _Stream:
    s = _Stream()
    s.chunks = [(start + i * step, i + 1) for i in range(n_tokens)]
    s.first = start
    return s


def test_window_speeds_count_only_while_every_stream_decodes():
    # Three streams at 100 tokens/s; one starts 0.2 s late: its late start must not lower anyone's speed.
    streams = [_steady(0.0, 100, 0.01), _steady(0.0, 100, 0.01), _steady(0.2, 100, 0.01)]
    assert window_speeds(streams) == pytest.approx([100.0] * 3)
    # A stream that starts after the others finished leaves no common window: no samples.
    assert window_speeds([_steady(0.0, 20, 0.01), _steady(1.0, 20, 0.01)]) == []


def test_level_speed_weighs_streams_by_their_window():
    # Two streams at 100 tokens/s over 1 s and one read late, bunched: 10 tokens in 0.01 s. A plain
    # mean of speeds would say 400 tokens/s; the ratio of sums stays near 100.
    samples = [Sample("decode", 3, 16, 0, 100.0, 100), Sample("decode", 3, 16, 0, 100.0, 100),
               Sample("decode", 3, 16, 0, 1000.0, 10)]
    samples += [Sample("prefill", 1, p, 0, 0.01 + 1e-5 * p, 1, p) for p in (16, 1024)]
    cal = _build(samples, "u", "m", None, False, False, 1.0)
    assert cal.profile.speed(3) == pytest.approx(210 / 2.01, rel=1e-4)


def test_context_cost_is_separated_from_the_decode_table():
    # True model: step(N) = d(N) + N x context x c, c = 1e-7; short waves at 16 + 48 context, long at 1024 + 48.
    c, d = 1e-7, {1: 0.004, 8: 0.005, 64: 0.012}
    samples = []
    for n, dn in d.items():
        samples.append(Sample("decode", n, 16, 0, 1.0 / (dn + n * (16 + 48) * c), 96))
        samples.append(Sample("decode-context", n, 1024, 0, 1.0 / (dn + n * (1024 + 48) * c), 96))
    samples += [Sample("prefill", 1, p, 0, 0.01 + 1e-5 * p, 1, p) for p in (16, 1024)]
    p = _build(samples, "u", "m", None, False, False, 1.0, decode_tokens=96).profile
    assert p.context_s_per_token == pytest.approx(c, rel=1e-3)
    assert p.decode_step_s == pytest.approx(list(d.values()), rel=1e-3)


def _samples(step_at: dict[int, float], intercept: float, slope: float) -> list[Sample]:
    out = [Sample("decode", n, 16, r, 1.0 / step, 96) for n, step in step_at.items() for r in range(2)]
    for p in (16, 512, 1536):
        out += [Sample("prefill", 1, p, r, intercept + slope * p, 1, p) for r in range(3)]
    return out


def test_fit_recovers_speeds_and_prefill_line_exactly_from_clean_samples():
    steps = {1: 0.004, 4: 0.005, 16: 0.008, 64: 0.02}
    cal = _build(_samples(steps, 0.006, 2e-5), "http://e", "m", None, True, False, 12.0)
    p = cal.profile
    assert p.decode_batch_sizes == [1, 4, 16, 64]
    assert p.decode_step_s == pytest.approx(list(steps.values()), rel=1e-5)
    assert p.prefill_s_per_token == pytest.approx(2e-5, rel=1e-5)
    # The intercept is one step (the first knot, 4 ms) plus 2 ms outside the engine.
    assert p.prefill_only_step_s is None
    assert p.request_overhead_s == pytest.approx(0.002, rel=1e-4)
    assert p.request_step_s == 0.0 and p.request_step_s_per_seq == 0.0  # no join waves measured
    assert "http://e" in p.description and "counted by /tokenize" in p.description


def test_noisy_faster_knot_is_clamped_and_said_so():
    cal = _build(_samples({1: 0.004, 2: 0.0035, 4: 0.005}, 0.006, 2e-5), "u", "m", None, False, False, 1.0)
    assert cal.profile.decode_step_s[1] == cal.profile.decode_step_s[0]
    assert "Clamped for monotonicity at L=[2]" in cal.profile.description


def test_outputs_fit_the_termination_log_and_keep_raw_samples_aside(tmp_path):
    sizes = {n: 0.004 + 0.0003 * n for n in default_concurrencies(256)}
    cal = _build(_samples(sizes, 0.006, 2e-5), "http://127.0.0.1:8000", "a-model-name" * 10, None, True, True, 300.0)
    paths = write_outputs(cal, tmp_path / "engine.yaml", plot=False)
    assert paths["profile"].stat().st_size < MAX_PROFILE_BYTES
    assert "plot" not in paths
    LatencyProfile.model_validate(yaml.safe_load(paths["profile"].read_text()))
    rows = paths["samples"].read_text().splitlines()
    assert len(rows) == 1 + len(cal.samples)


def test_proof_workload_deadlines_are_met_at_the_knee_and_capacity_is_positive():
    from saber_bench.live_vllm import KNEE_BATCH, latency_at, scale_workload

    p = LatencyProfile(name="cpu", decode_batch_sizes=[1, 16, 64], decode_step_s=[0.002, 0.0025, 0.008],
                       prefill_s_per_token=2e-5)
    w = scale_workload(p, 64)
    for name, t in w.classes.items():
        assert latency_at(p, KNEE_BATCH, w.prompt_tokens[name], t.max_tokens) < t.sla_s
    assert w.capacity_rps > 0 and 1 <= w.best_batch <= 64
    # A 10x slower engine: deadlines grow (past their floors) and capacity falls.
    slow = p.model_copy(update={"decode_step_s": [s * 10 for s in p.decode_step_s]})
    ws = scale_workload(slow, 64)
    assert ws.capacity_rps < w.capacity_rps
    assert ws.classes["generation"].sla_s > w.classes["generation"].sla_s


def test_proof_policies_become_the_sidecar_configs_they_name():
    from saber_bench.live_vllm import POLICIES, policy_config, scale_workload

    p = load_profile(None)
    w = scale_workload(p, 64)
    for name in POLICIES:
        cfg = policy_config(name, w, p, 64)
        assert all(c.on_miss == "reject" for c in cfg.classes)
        s = cfg.scheduling
        if name.startswith("static-"):
            assert s.policy == "static" and s.static_max_concurrency == int(name.split("-")[1])
        else:
            assert s.engine_max_num_seqs == 64
            assert (s.engine_profile == p) == (name == "saber-calibrated")
    assert policy_config("saber-paper", w, p, 64).scheduling.policy == "saber-paper"


def test_robustness_variants_change_the_engine_as_named():
    from saber_bench.robustness import (
        VARIANTS,
        keys,
        latency_factor,
        slowdown,
        variant_profile,
    )

    base = load_profile(None)
    assert variant_profile("prefill-x30").prefill_s_per_token == pytest.approx(30 * base.prefill_s_per_token)
    assert variant_profile("decode-x3").decode_step_s == pytest.approx([s / 3 for s in base.decode_step_s])
    assert len(set(variant_profile("flat").decode_step_s)) == 1
    assert slowdown("decode-x0.3", "W1") > 2.5 and slowdown("decode-x3", "W1") < 0.5
    assert latency_factor("prefill-x0.1", "W2") <= 1.0
    ks = keys(1)
    assert len(ks) == len(VARIANTS) * 3 * 3 * 11
    with pytest.raises(ValueError, match="unknown robustness variant"):
        keys(1, variants=["nope"])


def test_robustness_cells_are_deterministic_and_summarised():
    from saber_bench.robustness import keys, run

    ks = keys(1, variants=["prefill-x10"], workloads=["W2"], policies=["static-10", "saber"])
    a, b = run(ks, jobs=1, progress=False), run(ks, jobs=1, progress=False)
    assert [r["goodput"] for r in a["rows"]] == [r["goodput"] for r in b["rows"]]
    assert a["target"]["cells"] == 3
    for r in a["rows"]:
        assert r["best_static"] == "static-10"
        assert r["met"] == (r["goodput"]["saber"] >= r["goodput"]["static-10"] - 0.01)
    assert np.isfinite(a["target"]["worst_gap_points"])


def test_calibrate_command_is_registered_and_checks_its_arguments(capsys):
    from saber_cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--engine-url" in out and "--max-concurrency" in out and "--no-plot" in out
    assert main(["calibrate", "--engine-url", "http://127.0.0.1:9", "--out", "x.yaml", "--rounds", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_join_samples_give_the_per_request_costs_less_the_prefill():
    steps = {1: 0.004, 4: 0.005, 16: 0.008, 64: 0.02}
    samples = _samples(steps, 0.006, 2e-5)
    # Each arrival cost the streams its 16-token prefill (0.32 ms) + 1 ms + N x 50 us.
    samples += [Sample("join", n, 16, r, 16 * 2e-5 + 0.001 + n * 5e-5) for n in (4, 16, 48) for r in range(3)]
    p = _build(samples, "u", "m", None, False, False, 1.0).profile
    assert p.request_step_s == pytest.approx(0.001, rel=1e-3)
    assert p.request_step_s_per_seq == pytest.approx(5e-5, rel=1e-3)
    assert p.decode_step_s == pytest.approx(list(steps.values()), rel=1e-5)  # the table ignores the join waves
    assert "9 single-token arrivals" in p.description and "N=[4, 16, 48]" in p.description


def test_joins_that_cost_only_their_prefill_give_no_cost():
    steps = {1: 0.004, 16: 0.008}
    samples = _samples(steps, 0.003, 2e-5) + [Sample("join", n, 16, 0, 16 * 2e-5 * 0.9) for n in (4, 16)]
    p = _build(samples, "u", "m", None, False, False, 1.0).profile
    assert p.request_step_s == 0.0 and p.request_step_s_per_seq == 0.0
    assert p.request_overhead_s == 0.0  # intercept below one step: clamped, not negative
