"""One short live cell: the openai-style client -> real sidecar process -> real emulator process."""

import json

import pytest

from saber_bench.live import run_cells, simulate_cells, write_live

pytestmark = pytest.mark.slow


async def test_short_live_cell_matches_the_simulator(tmp_path):
    policies = ["static-10", "saber"]
    cells = await run_cells("W2", [10.0], policies, seeds=1, n=20, out=tmp_path)
    sim = simulate_cells("W2", [10.0], policies, 1, 20)
    assert [c["policy"] for c in cells] == policies
    for c in cells:
        assert c["errors"] == 0, "every request must end with a response"
        assert c["send_lag_max_s"] < 0.5, "the load generator fell behind its schedule"
        # 20 requests: one request is 5 points; live and sim agree within two requests.
        assert abs(c["goodput"] - sim[(10.0, c["policy"])]) <= 0.10 + 1e-9, (c["policy"], c["goodput"], sim)
    paths = write_live(tmp_path, cells, sim, {"command": "test", "machine": "test", "elapsed_s": 1.0}, "test")
    summary = json.loads(paths["summary"].read_text())
    assert {c["policy"] for c in summary["cells"]} == set(policies)
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    # Logs of the processes we started, and they were stopped (the emulator and both sidecars).
    assert (tmp_path / "logs" / "emulator.log").exists()
