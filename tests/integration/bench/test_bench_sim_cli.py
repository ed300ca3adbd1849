"""`saber bench sim` end to end: the CLI, the process pool, summary.json, report and plots."""

import json

from saber_cli.main import main


def test_sim_smoke_suite_writes_summary_report_and_plots(tmp_path):
    out = tmp_path / "sim"
    rc = main(["bench", "sim", "--suite", "smoke", "--seeds", "1", "--jobs", "2", "--no-progress", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    cells = [c for c in summary["cells"] if not c["reference"]]
    assert {(c["workload"], c["rate"], c["policy"]) for c in cells} == {
        ("W1", r, p) for r in (5.0, 15.0) for p in ("static-50", "saber")
    }
    for c in cells:
        assert 0.0 <= c["goodput"] <= 1.0 and c["seeds"] == 1
        assert set(c["attainment"]) == {"qna", "summary", "generation", "translation"}
        assert c["e2e_p50"] <= c["e2e_p95"] <= c["e2e_p99"]
    assert set(summary["cv"]["W1"]) >= {"static-50", "saber", "best-static"}
    assert summary["elapsed_s"] > 0
    assert any(c["policy"] == "capacity-bound" for c in summary["cells"])
    for name in ("goodput_vs_rate.png", "cv.png", "latency_cdf.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "## W1: goodput %" in report and "rejected" in report


def test_sim_rejects_bad_arguments(tmp_path, capsys):
    assert main(["bench", "sim", "--suite", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown suite" in capsys.readouterr().err
    assert main(["bench", "sim", "--suite", "smoke", "--policies", "fifo", "--out", str(tmp_path)]) == 2
    assert "unknown policy" in capsys.readouterr().err


def test_component_benchmark_that_is_not_installed_says_so(capsys):
    import argparse

    from saber_bench.cli import _component

    run = _component("saber_nonexistent.perf")
    assert run(argparse.Namespace(rest=[])) == 2
    assert "saber_nonexistent.perf is not available" in capsys.readouterr().err
