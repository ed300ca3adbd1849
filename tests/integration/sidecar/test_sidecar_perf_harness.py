"""The proxy benchmark's harness (`python -m saber_bench.perf.sidecar`) on a small load: real emulator,
sidecar and TCP-pipe processes on loopback. Checks the harness, not performance figures."""

import json
import subprocess
import sys

import numpy as np

from saber_bench.perf.sidecar import added_ci, flat_profile


def test_perf_harness_measures_every_target(tmp_path):
    out = tmp_path / "perf"
    proc = subprocess.run(
        [sys.executable, "-m", "saber_bench.perf.sidecar", "--out", str(out), "--streams", "8", "--duration", "1.5",
         "--rounds", "1", "--ramp", "0.5", "--max-tokens", "8", "--flat-step-ms", "10", "--jitter-ms", "10",
         "--floor", "--policies", "static", "saber"],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "sidecar_perf.json").read_text())
    assert report["latency_profile"].endswith("flat-10ms.json")
    for result in (report["policies"]["static"], report["policies"]["saber"], report["floor"]):
        for arm in ("direct", "sidecar"):
            assert result[arm]["requests"] > 0 and result[arm]["errors"] == 0
            assert result[arm]["tokens"] == 8 * result[arm]["requests"]  # ignore_eos: every request runs to max_tokens
        low, high = result["added_ttft_p50_ms_ci95"]
        assert low <= high
        assert result["proxy_cpu_ms_per_1000_tokens"] > 0
    # Only requests through a sidecar carry the gate's queue time.
    assert "gate_queue_p50_ms" in report["policies"]["saber"]["sidecar"]
    assert "gate_queue_p50_ms" not in report["floor"]["sidecar"]
    assert "floor (tcp pipe): added TTFT" in proc.stdout


def test_bootstrap_interval_finds_a_known_shift():
    rng = np.random.default_rng(3)
    direct = rng.uniform(50, 100, 4000)  # TTFT quantised by a 50 ms step, random phase
    via = rng.uniform(50, 100, 4000) + 2.0
    low50, high50 = added_ci(direct, via, 50)
    low99, high99 = added_ci(direct, via, 99)
    assert low50 < 2.0 < high50 and low50 > 0
    assert low99 < 2.0 < high99


def test_flat_profile_is_a_valid_emulator_profile(tmp_path):
    from saber_emulator.profile import load_profile

    profile = load_profile(str(flat_profile(tmp_path, 25)))
    assert profile.name == "flat-25ms"


def test_parser_cost_measures_the_engine_clients_parser():
    from saber_bench.perf.sidecar import parser_cost

    cost = parser_cost(chunks=2_000, repeats=2)  # asserts inside that every chunk reached the sink
    assert 0 < cost["us_per_chunk_best"] <= cost["us_per_chunk_median"] and cost["chunk_bytes"] > 100
