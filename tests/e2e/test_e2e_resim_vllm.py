"""`saber bench resim` on a kept real-vLLM proof run (docs/data/live-vllm-proof-run4): its arrivals
rebuilt offline, prompts counted by the tokenizer the engine served (the tiny model's, built by the
same seeded recipe), give back the run's own simulated goodput for every static cap, where no
policy learning can have changed since (the saber cells move with the policy's code)."""

import asyncio
import json
from pathlib import Path

import pytest

from saber_bench.resim import evaluate, load_run, parse_vary, rebuild, token_counter
from saber_cli.main import main

pytestmark = pytest.mark.vllm

RUN4 = Path(__file__).resolve().parents[2] / "docs" / "data" / "live-vllm-proof-run4"


def test_a_kept_runs_static_cells_are_simulated_again_to_the_run_own_numbers(tiny_model_dir):
    run = load_run(RUN4)
    arrivals, probes = asyncio.run(rebuild(run, token_counter(tiny_model_dir / "tokenizer.json")))
    assert len(probes) == len(run.probes) == 5
    base = evaluate(run, arrivals, probes, run.profile)
    got = {(c["load"], c["policy"]): c["sim"] / 100 for c in base["agreement"]["cells"]}
    statics = [c for c in run.cells if c["policy"].startswith("static-")]
    assert len(statics) == 16
    for c in statics:
        assert got[(c["load"], c["policy"])] == pytest.approx(c["sim_goodput"], abs=1e-12), c["policy"]
    # A costlier arrival makes the simulated engine slower: vLLM's own cap at 2x loses goodput.
    (_, slower), = parse_vary("request_step_s=0.004", run.profile)[1]
    worse = evaluate(run, arrivals, probes, slower)
    cap = {(c["load"], c["policy"]): c["sim"] for c in worse["agreement"]["cells"]}
    assert cap[(2.0, "static-64")] < 100 * got[(2.0, "static-64")] - 5


def test_the_command_writes_its_table(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "resim"
    assert main(["bench", "resim", str(RUN4), "--tokenizer", str(tiny_model_dir / "tokenizer.json"),
                 "--vary", "context_s_per_token=x1.25", "--out", str(out)]) == 0
    data = json.loads((out / "resim.json").read_text())
    assert [r["profile"] for r in data["results"]] == ["as calibrated", "context_s_per_token=x1.25"]
    md = (out / "resim.md").read_text()
    assert "| as calibrated | " in md and "evidence: live = the run's (real vLLM, CPU build)" in md
