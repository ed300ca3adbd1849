"""A code-trace window live: client -> real sidecar -> real emulator, output lengths hidden from
the gate (the client sends the cap; the emulator stops at vllm_xargs.saber_output_tokens)."""

import json

import pytest

from saber_bench.grid import RunKey
from saber_bench.live import run_cells
from saber_bench.trace_bench import TraceSource, run_trace_one
from saber_bench.trace_live import LiveTrace

pytestmark = pytest.mark.slow


async def test_trace_window_live_stops_at_the_hidden_lengths_and_matches_sim(tmp_path):
    src = TraceSource(count=40)
    rate = 3.0
    cells = await run_cells(src.label, [rate], ["static-20", "saber"], 1, 0, tmp_path, trace=LiveTrace(src))
    specs = {s.id: s for s in src.specs(rate=rate)}
    assert all(s.max_tokens == 256 for s in specs.values()) and len({s.output_tokens for s in specs.values()}) > 10
    for c in cells:
        assert c["errors"] == 0
        records = [json.loads(line) for line in
                   (tmp_path / "requests" / f"{src.label}-{rate:g}-{c['policy']}-0.jsonl").read_text().splitlines()]
        served = [r for r in records if not r["rejected"]]
        assert served and all(r["output_tokens"] == specs[r["id"]].output_tokens for r in served)
        sim = run_trace_one(src, RunKey(src.label, rate, c["policy"], 0)).stats.goodput
        # 40 requests: one is 2.5 points; live and sim agree within four requests.
        assert abs(c["goodput"] - sim) <= 0.10 + 1e-9, (c["policy"], c["goodput"], sim)
    cfg = (tmp_path / "configs" / "saber.yaml").read_text()
    assert "name: code" in cfg and "deadline_seconds: 2.0" in cfg


def test_cli_live_trace_writes_labelled_results(tmp_path):
    from saber_cli.main import main

    rc = main(["bench", "live", "--trace", "code", "--count", "15", "--rates", "3", "--policies", "saber",
               "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["meta"]["evidence"] == "live on the emulator (paper profile)"
    assert summary["meta"]["synthetic"] is True and summary["meta"]["max_tokens_cap"] == 256
    assert "evidence: **live on the emulator" in (tmp_path / "report.md").read_text()
