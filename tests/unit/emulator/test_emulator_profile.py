"""Latency profile: calibration from the paper's CSV, validation, interpolation."""

import pytest
from pydantic import ValidationError

from paper_data import PAPER_CSV as CSV
from saber_emulator.profile import LatencyProfile, builtin_profile_path, calibrate, load_profile, read_speed_csv


def test_builtin_profile_is_the_calibration_of_the_paper_csv():
    fresh = calibrate(CSV, name="paper-qwen2.5-coder-3b")
    shipped = load_profile(None)
    assert shipped.decode_batch_sizes == fresh.decode_batch_sizes
    assert shipped.decode_step_s == pytest.approx(fresh.decode_step_s, rel=1e-12)


def test_speed_at_every_measured_batch_size_is_the_csv_mean():
    means = read_speed_csv(CSV)
    profile = load_profile(None)
    assert sorted(means) == list(range(1, 11)) + list(range(20, 61, 10))
    for size, mean in means.items():
        assert profile.speed(size) == pytest.approx(mean, rel=1e-12)


def test_interpolates_monotonically_between_and_beyond_knots():
    p = load_profile(None)
    times = [p.decode_time(n) for n in range(1, 300)]
    assert all(b >= a for a, b in zip(times, times[1:]))
    assert p.decode_time(15) == pytest.approx((p.decode_time(10) + p.decode_time(20)) / 2)
    assert p.decode_time(70) > p.decode_time(60)


def test_step_time_adds_prefill_and_context_costs():
    p = LatencyProfile(name="t", decode_batch_sizes=[1, 2], decode_step_s=[0.01, 0.02],
                       prefill_s_per_token=1e-4, context_s_per_token=1e-6)
    assert p.step_time(2, 100, 1000) == pytest.approx(0.02 + 0.01 + 0.001)
    assert p.step_time(0, 10) == pytest.approx(0.01 + 0.001)  # prefill-only step pays the first knot


@pytest.mark.parametrize("sizes,steps,msg", [
    ([1, 2], [0.02, 0.01], "non-decreasing"),
    ([2, 1], [0.01, 0.02], "strictly increasing"),
    ([1, 2], [0.01], "same length"),
    ([0, 1], [0.01, 0.02], "start at 1"),
])
def test_rejects_bad_tables(sizes, steps, msg):
    with pytest.raises(ValidationError, match=msg):
        LatencyProfile(name="bad", decode_batch_sizes=sizes, decode_step_s=steps)


def test_calibrate_cli_writes_a_loadable_profile(tmp_path):
    from saber_cli.main import main

    csv = tmp_path / "speeds.csv"
    csv.write_text("Batch Size,Generation Speed\n1,100\n1,98\n4,80\n8,50\n")
    out = tmp_path / "mine.json"
    assert main(["emulator", "calibrate", str(csv), "-o", str(out)]) == 0
    p = load_profile(str(out))
    assert p.name == "mine"
    assert p.speed(1) == pytest.approx(99.0)
    assert p.speed(8) == pytest.approx(50.0)


def test_read_speed_csv_reports_bad_rows(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("L,v\n1,fast\n")
    with pytest.raises(ValueError, match="bad.csv:2"):
        read_speed_csv(bad)


def test_unknown_profile_names_the_builtins():
    with pytest.raises(FileNotFoundError, match="paper-qwen2.5-coder-3b"):
        load_profile("no-such-profile")
    assert builtin_profile_path().exists()
