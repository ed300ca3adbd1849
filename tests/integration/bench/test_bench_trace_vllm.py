"""Hidden output lengths on the real vLLM engine (CPU build): the StopAtLength logits processor
stops a request at vllm_xargs.saber_output_tokens while the request states only max_tokens; and a
short trace window live through the sidecar in front of it."""

from __future__ import annotations

import json

import aiohttp
import pytest

from saber_bench.trace_live import fit_prompt, stop_at_length_vllm
from saber_bench.vllm_cpu import build_tiny_model, find_vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = "def fibonacci(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if find_vllm_python() is None:
        pytest.fail("the vLLM CPU venv (.venv-vllm) is missing: run `make test`", pytrace=False)
    d = tmp_path_factory.mktemp("vllm-stop")
    srv = stop_at_length_vllm(build_tiny_model(d / "model"), max_num_seqs=16, max_model_len=2048,
                           log_path=d / "vllm.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


async def _complete(server, **body) -> tuple[int, dict]:
    body = {"model": server.served_model_name, "prompt": PROMPT, "temperature": 0.0, **body}
    async with aiohttp.ClientSession() as s, s.post(server.base_url + "/v1/completions", json=body) as r:
        return r.status, await r.json()


@pytest.mark.parametrize("n", [1, 7, 40])
async def test_stops_exactly_at_the_hidden_length(server, n):
    status, body = await _complete(server, max_tokens=64, vllm_xargs={"saber_output_tokens": n})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == n
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_the_cap_still_wins_and_requests_without_it_are_untouched(server):
    status, body = await _complete(server, max_tokens=12, vllm_xargs={"saber_output_tokens": 50})
    assert status == 200 and body["usage"]["completion_tokens"] == 12 and body["choices"][0]["finish_reason"] == "length"
    status, body = await _complete(server, max_tokens=30, ignore_eos=True)
    assert status == 200 and body["usage"]["completion_tokens"] == 30


async def test_a_bad_value_is_a_clear_400(server):
    status, body = await _complete(server, max_tokens=8, vllm_xargs={"saber_output_tokens": 0})
    assert status == 400 and "saber_output_tokens" in json.dumps(body)


async def test_prompts_are_fitted_to_the_exact_token_count(server):
    async with aiohttp.ClientSession() as s:
        for n in (5, 120, 900):
            text = await fit_prompt(s, server.base_url, server.served_model_name, n, salt=n)
            async with s.post(server.base_url + "/tokenize", json={"model": server.served_model_name, "prompt": text,
                                                                  "add_special_tokens": False}) as r:
                assert len((await r.json())["tokens"]) == n


async def test_trace_window_live_through_the_sidecar_on_vllm(server, tmp_path):
    from dataclasses import replace

    from saber_bench.live import run_cells
    from saber_bench.trace_bench import TraceSource
    from saber_bench.trace_live import LiveTrace

    src = replace(TraceSource(count=8, max_tokens=32), max_model_len=2048)
    cells = await run_cells(src.label, [1.0], ["saber"], 1, 0, tmp_path, engine_url=server.base_url,
                            trace=LiveTrace(src, engine="vllm"))
    assert cells[0]["errors"] == 0
    specs = {s.id: s for s in src.specs(rate=1.0)}
    records = [json.loads(x) for x in (tmp_path / "requests" / f"{src.label}-1-saber-0.jsonl").read_text().splitlines()]
    served = [r for r in records if not r["rejected"]]
    assert len(served) >= 6
    assert all(r["output_tokens"] == specs[r["id"]].output_tokens for r in served)


async def test_repeats_interleave_policies_and_capacity_is_probed_on_vllm(server, tmp_path):
    """`saber bench live --engine vllm --trace`'s runner: the capacity search on the window, then
    every policy per repeat on the same arrivals, each with its own record file."""
    from dataclasses import replace

    from saber_bench.trace_bench import TraceSource
    from saber_bench.trace_live import run_vllm_trace

    src = replace(TraceSource(count=8, max_tokens=32), max_model_len=2048)
    cells, info = await run_vllm_trace(src, ["static-2", "saber"], 2, tmp_path, loads=[1.0],
                                       max_num_seqs=16, engine_url=server.base_url)
    cap = info["capacity"]
    assert cap["capacity_rps"] > 0 and cap["probes"]
    passing = [p["rate"] for p in cap["probes"] if p["goodput"] >= cap["target"]]
    assert cap["capacity_rps"] == max(passing)
    assert cap["first_failing_rps"] is None or cap["first_failing_rps"] > cap["capacity_rps"]
    rate = round(cap["capacity_rps"], 2)
    assert [c["policy"] for c in cells] == ["static-2", "saber"] and all(c["rate"] == rate for c in cells)
    assert all(len(c["goodput_per_seed"]) == 2 and c["errors"] == 0 for c in cells)
    for policy in ("static-2", "saber"):
        for rep in (0, 1):
            assert len((tmp_path / "requests" / f"{rate:g}-{policy}-{rep}.jsonl").read_text().splitlines()) == 8
    assert "engine_max_num_seqs: 16" in (tmp_path / "configs" / "saber.yaml").read_text()
