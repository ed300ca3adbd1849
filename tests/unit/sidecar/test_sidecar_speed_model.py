import json
import math
import subprocess
import sys

import pytest

from paper_data import PAPER_CSV
from saber_sidecar.config import SpeedModelConfig
from saber_sidecar.speed_model import FORMS, SpeedModel, fit_all, read_samples_csv

# The paper's R² per form (SABER.md): usl 0.992, logistic 0.956, linear 0.913.
PAPER_R2 = {"usl": 0.992, "logistic": 0.956, "linear": 0.913}


@pytest.fixture(scope="module")
def paper_samples():
    if not PAPER_CSV.exists():
        pytest.fail(f"paper data missing: {PAPER_CSV}")
    return read_samples_csv(str(PAPER_CSV))


def test_fit_reproduces_paper_ranking_and_r2(paper_samples):
    L, v = paper_samples
    assert len(L) == 255
    report = fit_all(L, v)
    for form, r2 in PAPER_R2.items():
        assert abs(report.results[form].r2 - r2) <= 0.01, (form, report.results[form].r2)
    assert report.best == "usl"
    assert report.results["usl"].r2 > report.results["logistic"].r2 > report.results["linear"].r2
    a, s, k = report.results["usl"].params
    assert a == pytest.approx(102.55, abs=0.1) and s == pytest.approx(0.0300, abs=0.001)


def test_saber_fit_cli_json(paper_samples):
    out = subprocess.run(
        [sys.executable, "-m", "saber_cli.main", "fit", str(PAPER_CSV), "--json"],
        capture_output=True, text=True, check=True,
    )
    data = json.loads(out.stdout)
    assert set(data) == {"linear", "logistic", "usl", "best"}
    assert data["best"] == "usl"
    for form in FORMS:
        assert set(data[form]) == {"r2", "mse", "params"}
        assert data[form]["mse"] > 0
        assert abs(data[form]["r2"] - PAPER_R2[form]) <= 0.01


def test_saber_fit_cli_table_and_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "saber_cli.main", "fit", str(PAPER_CSV)], capture_output=True, text=True)
    assert out.returncode == 0 and "best: usl" in out.stdout and "R2" in out.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("L,v\n1,90\n2,abc\n")
    out = subprocess.run([sys.executable, "-m", "saber_cli.main", "fit", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "bad.csv:3: not numbers" in out.stderr
    out = subprocess.run([sys.executable, "-m", "saber_cli.main", "fit", str(tmp_path / "none.csv")], capture_output=True, text=True)
    assert out.returncode == 2 and "cannot read" in out.stderr


@pytest.mark.parametrize(
    "L, v, fragment",
    [
        ([1, 2, 3], [9, 8, 7], "at least 4 samples"),
        ([1, 1, 1, 1], [9, 8, 7, 6], "3 or more distinct"),
        ([1, 2, 3, 4], [9, 8, -7, 6], "positive"),
        ([1, 2, 3, 4], [9, 8, float("nan"), 6], "finite"),
        ([1, 2, 3], [9, 8, 7, 6], "same length"),
    ],
)
def test_fit_rejects_bad_samples(L, v, fragment):
    with pytest.raises(ValueError, match=fragment):
        fit_all(L, v)


def test_fit_recovers_a_known_linear_curve():
    L = [1, 2, 4, 8, 16, 32]
    v = [100 - 0.5 * x for x in L]
    report = fit_all(L, v)
    assert report.results["linear"].params == pytest.approx((100, -0.5), abs=1e-6)
    assert report.results["linear"].r2 == pytest.approx(1.0)


@pytest.mark.parametrize(
    "form, params",
    [("usl", (102.55, 0.03, -0.0001)), ("linear", (86.65, -0.758)), ("logistic", (120.0, 0.1, 30.0, 10.0))],
)
def test_speed_is_positive_and_never_rises(form, params):
    m = SpeedModel(form, params)
    values = [m.speed(L) for L in range(0, 5000, 7)]
    assert all(v > 0 for v in values)
    assert all(b <= a for a, b in zip(values, values[1:]))
    assert m.speed(0) == m.speed(1)
    # Fractional concurrency interpolates between neighbours.
    assert m.speed(2) >= m.speed(2.5) >= m.speed(3)


def test_usl_turning_point_holds_throughput_flat():
    m = SpeedModel("usl", (102.55, 0.03, -0.0001))
    turn = m.valid_up_to  # the raw curve starts rising at L = -s / 2k = 150
    assert turn == pytest.approx(150, abs=1)
    assert m.speed(300) * 300 == pytest.approx(m.speed(turn) * turn, rel=1e-9)
    assert m.speed(10) == pytest.approx(102.55 / (1 + 0.3 - 0.01))


def test_from_config_defaults_to_paper_curve():
    m = SpeedModel.from_config(SpeedModelConfig())
    assert m.form == "usl" and m.params == (102.55, 0.03, -0.0001)
    assert m.r2 is None and m.online_refit


def test_online_refit_follows_a_different_engine():
    """An engine twice as fast as the prior: after enough samples the model says so."""
    m = SpeedModel.from_config(SpeedModelConfig(window=64, min_samples=16, refit_every=8))
    truth = SpeedModel("usl", (205.0, 0.03, -0.0001))
    refits = [m.observe(L, truth.speed(L)) for L in [1, 3, 5, 8, 12, 16, 20, 24] * 4]
    assert any(refits) and m.refits >= 1
    for L in (1, 10, 20):
        assert m.speed(L) == pytest.approx(truth.speed(L), rel=0.03)
    # Outside the data (L > 24) the prior's shape, scaled, keeps extrapolation sane.
    assert m.speed(60) == pytest.approx(truth.speed(60), rel=0.1)
    assert m.r2 is not None and m.r2 > 0.99
    assert m.error_ratio is not None and m.error_ratio < 0.01


def test_error_ratio_stays_small_where_r2_is_uninformative():
    """Concurrency held in a narrow band: tiny noise leaves R² low, the relative error stays small."""
    m = SpeedModel.from_config(SpeedModelConfig(window=64, min_samples=16, refit_every=16))
    truth = SpeedModel("usl", (102.55, 0.03, -0.0001))
    noise = [0.99, 1.01, 1.0, 0.985, 1.015, 1.0, 0.99, 1.01]
    for i in range(32):
        L = 10 + (i % 2)
        m.observe(L, truth.speed(L) * noise[i % len(noise)])
    assert m.refits >= 1
    assert m.r2 is not None and m.r2 < 0.8
    assert m.error_ratio is not None and m.error_ratio < 0.03


def test_refit_waits_for_min_samples_and_ignores_garbage():
    m = SpeedModel(online_refit=True, window=32, min_samples=16, refit_every=1)
    assert not any(m.observe(L, 90.0 - L) for L in range(1, 16))
    assert m.refits == 0
    assert m.observe(0, 50) is False and m.observe(3, math.inf) is False and m.samples == 15
    assert m.observe(16, 74.0)
    assert m.refits == 1


def test_refit_on_one_concurrency_level_scales_the_prior():
    """Samples at one level say how fast the engine is, not the curve's shape: keep the prior's."""
    m = SpeedModel(online_refit=True, window=32, min_samples=16, refit_every=16)
    prior = SpeedModel()
    for _ in range(16):
        m.observe(5, 80.0)
    assert m.refits == 1
    assert m.speed(5) == pytest.approx(80.0, rel=0.02)
    assert m.speed(30) / m.speed(5) == pytest.approx(prior.speed(30) / prior.speed(5), rel=0.03)


def test_read_samples_csv(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("Batch Size,Generation Speed\n1,95\n\n2,93.5\n")
    assert read_samples_csv(str(p)) == ([1.0, 2.0], [95.0, 93.5])
    p.write_text("1\n")
    with pytest.raises(ValueError, match="two columns"):
        read_samples_csv(str(p))


@pytest.mark.parametrize(
    "form, truth, start",
    [
        ("usl", (102.55, 0.03, -0.0001), (102.55, 0.03, -0.0001)),
        ("usl", (205.0, 0.05, 0.0002), (102.55, 0.03, -0.0001)),
        ("linear", (86.65, -0.758), (80.0, -0.5)),
        ("logistic", (110.0, 0.08, 40.0, 0.0), (100.0, 0.06, 35.0, 0.0)),
    ],
)
def test_fit_online_recovers_a_known_curve(form, truth, start):
    """The online fit (closed form + Gauss-Newton, no scipy) finds a curve from exact samples."""
    import numpy as np

    from saber_sidecar.speed_model import CURVES, fit_online

    L = np.array([1, 2, 4, 8, 12, 16, 24, 32, 48, 60], dtype=float)
    v = np.asarray(CURVES[form](L, *truth), dtype=float)
    params = fit_online(form, L, v, start)
    assert params is not None
    fitted = np.asarray(CURVES[form](L, *params), dtype=float)
    assert np.max(np.abs(fitted - v) / v) < 0.01


def test_online_refit_fits_only_its_form_without_scipy(paper_samples):
    """Refits run on the request path: one form, R² on the window, and scipy is never imported."""
    code = (
        "import sys\n"
        "from saber_sidecar.speed_model import SpeedModel, read_samples_csv\n"
        f"L, v = read_samples_csv({str(PAPER_CSV)!r})\n"
        "m = SpeedModel(online_refit=True, window=512, min_samples=32, refit_every=10**9)\n"
        "for x, y in zip(L, v): m.observe(x, y)\n"
        "r = m.refit()\n"
        "print(sorted(r.results), r.best, round(m.r2, 3), 'scipy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["['usl']", "usl"]
    assert float(out[2]) == pytest.approx(PAPER_R2["usl"], abs=0.01)
    assert out[3] == "False"
