"""`saber calibrate` against a real `saber emulator` process: the known profile must come back.

Tolerances: the emulator steps in real time and its step intervals stay within ~1 ms of the model
when the machine is quiet (p99 6.9 ms under load, docs/EMULATOR.md); a decode wave averages over
~50 steps of 10-23 ms, so the mean step time is within a few percent: 10% allows a loaded machine.
The prefill signal is 5e-5 s x 1,500 tokens = 75 ms of TTFT difference against a few ms of jitter
per request, median of 3: 25%.
"""

import asyncio
import json
import subprocess
import sys

import pytest
import yaml

from saber_bench.calibrate import MAX_PROFILE_BYTES
from saber_bench.live import Proc, _spawn, wait_ready
from saber_emulator.profile import LatencyProfile, load_profile
from saber_sidecar.config import SidecarConfig

pytestmark = pytest.mark.slow


async def _emulator(tmp_path, *extra) -> Proc:
    proc = await _spawn("emulator", ["emulator", "--max-num-seqs", "32", *extra], tmp_path / "logs")
    await wait_ready(proc, "/health")
    return proc


async def test_calibrate_recovers_the_emulators_profile_and_its_file_is_accepted_everywhere(tmp_path):
    truth = load_profile(None)
    out = tmp_path / "engine.yaml"
    emu = await _emulator(tmp_path)
    try:
        # Through the command, as a user runs it (in a subprocess: its own event loop and clock).
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "saber_cli", "calibrate", "--engine-url", emu.url, "--out", str(out),
             "--max-concurrency", "32", "--concurrency", "1,4,16,32", "--decode-tokens", "64",
             "--prompt-lengths", "16,512,1536", "--join-tokens", "0", "--no-progress"],
            check=False, capture_output=True, text=True, timeout=240)
    finally:
        emu.stop()
    assert done.returncode == 0, done.stderr
    assert "prefill" in done.stdout and "wrote" in done.stdout

    got = load_profile(str(out))
    assert got.decode_batch_sizes == [1, 4, 16, 32]
    for n, step in zip(got.decode_batch_sizes, got.decode_step_s):
        assert step == pytest.approx(truth.decode_time(n), rel=0.10), n
    assert got.prefill_s_per_token == pytest.approx(truth.prefill_s_per_token, rel=0.25)
    # The emulator's profile has no context cost: what is found must be noise, under 10% of a step
    # at the largest wave's context (32 sequences of ~1,100 tokens).
    assert got.context_s_per_token * 32 * 1100 < 0.10 * truth.decode_time(32)
    assert "saber calibrate" in got.description and emu.url in got.description
    # The emulator's steps carry no per-request costs: what is found is its own HTTP path (a few ms
    # at most). The join cost was skipped (--join-tokens 0; measured in the test below).
    assert 0.0 <= got.request_overhead_s < 0.02, got.request_overhead_s
    assert got.request_step_s == 0.0 and got.request_step_s_per_seq == 0.0

    assert out.stat().st_size < MAX_PROFILE_BYTES
    rows = (tmp_path / "engine.samples.csv").read_text().splitlines()
    assert rows[0].startswith("kind,concurrency")
    assert sum(r.startswith("decode,32,") for r in rows) >= 32  # two waves of 32, most inside the window
    assert sum(r.startswith("prefill,") for r in rows) == 9
    assert not [r for r in rows if r.startswith("join,")]
    assert (tmp_path / "engine.png").read_bytes()[:4] == b"\x89PNG"

    # The same file, pasted under scheduling.engine_profile, is a valid sidecar config.
    data = {"classes": [{"name": "chat", "deadline_seconds": 2.0}], "default_class": "chat",
            "scheduling": {"policy": "saber", "engine_profile": yaml.safe_load(out.read_text())}}
    cfg = SidecarConfig.model_validate(data)
    assert cfg.scheduling.engine_profile == got

    # `saber bench sim --profile FILE.yaml` runs on it ...
    sim_out = tmp_path / "sim"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "saber_cli", "bench", "sim", "--suite", "smoke", "--seeds", "1", "--jobs", "1",
         "--no-progress", "--profile", str(out), "--out", str(sim_out)],
        check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((sim_out / "summary.json").read_text())["meta"]["profile"] == str(out)

    # ... and `saber emulator --profile FILE.yaml` serves with it.
    emu2 = await _emulator(tmp_path, "--profile", str(out))
    try:
        assert got.name in emu2.tail(50)
    finally:
        emu2.stop()


async def test_calibrate_measures_what_a_request_costs_the_batch_it_joins(tmp_path):
    from saber_bench.calibrate import calibrate

    # An engine whose join costs are known: 3 ms per request entering a step plus 100 us per sequence
    # decoding in it (emulated; on the 2-core machine real vLLM's are 0.3-0.5 ms and 0-40 us).
    truth = LatencyProfile(name="joins", decode_batch_sizes=[1, 4, 16, 32],
                           decode_step_s=[0.002, 0.0025, 0.004, 0.006], prefill_s_per_token=2e-5,
                           request_step_s=0.003, request_step_s_per_seq=1e-4)
    truth.save(tmp_path / "truth.yaml")
    emu = await _emulator(tmp_path, "--profile", str(tmp_path / "truth.yaml"))
    try:
        cal = await calibrate(emu.url, max_concurrency=32, concurrencies=[1, 4, 16, 32], decode_tokens=64,
                              prompt_lengths=(16, 512), prefill_repeats=2, context_tokens=0, progress=False)
    finally:
        emu.stop()
    joins = [s for s in cal.samples if s.kind == "join"]
    assert sorted({s.concurrency for s in joins}) == [4, 16, 24]  # from 4 to 3/4 of the cap, below it
    assert len(joins) >= 30
    got = cal.profile
    assert got.request_step_s == pytest.approx(0.003, rel=0.25)
    assert got.request_step_s_per_seq == pytest.approx(1e-4, rel=0.3)
    # The decode table is the closed waves', not moved by the join waves.
    assert got.decode_step_s == pytest.approx(truth.decode_step_s, rel=0.10)


def test_calibrate_reports_an_unreachable_engine_clearly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "saber_cli", "calibrate", "--engine-url", "http://127.0.0.1:9", "--out",
         str(tmp_path / "x.yaml"), "--no-progress"], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "cannot reach the engine" in done.stderr
    assert not (tmp_path / "x.yaml").exists()
