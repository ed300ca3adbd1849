"""The gate learns the real engine it runs on: vLLM (CPU build, a small random-weight Llama).

The session's tiny model (2 layers, 128 wide) is so fast that HTTP and the API server, not the
engine, set its times, and its prefill is nearly free; this test builds a larger one (6 layers,
768 wide, 42M parameters: ~18 ms a decode step, like a small model on a CPU) and serves it with
its own vLLM server (max_num_seqs 4).

The sidecar starts from the shipped prior (the paper's GPU curve, 5e-5 s per prompt token), a
bounded number of requests go through it at two concurrencies with short and long prompts, and
its learned engine model is compared with an independent measurement of the same engine taken
directly (no sidecar): per-request decode speed at batch 1 and 4 (the engine's `max_num_seqs`),
and the prefill cost per prompt token from time to first token of long against short prompts.
A function check with a 25% tolerance; performance lives in the benchmark.
"""

import asyncio
import os
import statistics
import subprocess
import time
from pathlib import Path

import openai
import pytest

from saber_bench.vllm_cpu import VLLMServer, find_vllm_python
from saber_bench.vllm_model import STAMP_NAME, TINY_MODEL_SCRIPT
from saber_sidecar.config import parse_config
from saber_sidecar.server import SidecarServer
from saber_sidecar.settings import SidecarSettings

pytestmark = pytest.mark.vllm

SHORT = "def fib(n):"
LONG = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 60  # ~1,700 tokens
DECODE_TOKENS = 64
SEATS = 4


@pytest.fixture(scope="module")
def small_engine(request, tmp_path_factory):
    """A vLLM CPU server with a 42M-parameter random Llama (built once into the pytest cache)."""
    if os.environ.get("SABER_SKIP_VLLM") == "1":
        pytest.skip("SABER_SKIP_VLLM=1: real vLLM tests skipped on request")
    python = find_vllm_python()
    if python is None:
        pytest.fail("the vLLM CPU venv (.venv-vllm) is missing: run `make test`", pytrace=False)
    cache = getattr(request.config, "cache", None)
    out = Path(cache.mkdir("saber-small-llama")) if cache is not None else tmp_path_factory.mktemp("small")
    if not (out / STAMP_NAME).is_file():
        env = {**os.environ, "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        subprocess.run([str(python), str(TINY_MODEL_SCRIPT), str(out), "--hidden-size", "768", "--layers", "6",
                        "--heads", "12"], env=env, check=True, capture_output=True, timeout=600)
    server = VLLMServer(out, max_num_seqs=SEATS, log_path=tmp_path_factory.mktemp("vllm-small") / "vllm.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()

CONFIG = """
classes:
  - name: batch
    deadline_seconds: 600
default_class: batch
scheduling:
  policy: saber
  engine_max_num_seqs: {seats}
"""


async def _stream(client, model, prompt, max_tokens):
    """(ttft, inter-token seconds over the decode span, prompt tokens) of one streamed completion."""
    sent = time.perf_counter()
    first = last = None
    usage = None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices:
            now = time.perf_counter()
            first = first or now
            last = now
    return first - sent, (last - first) / max(1, usage.completion_tokens - 1), usage.prompt_tokens


async def measure_engine(client, model, seats):
    """Direct measurement: decode speed at batch 1 and `seats`, prefill seconds per prompt token."""
    speeds = {}
    for L in (1, seats):
        itls = []
        for _ in range(3):
            done = await asyncio.gather(*(_stream(client, model, SHORT, DECODE_TOKENS) for _ in range(L)))
            itls += [itl for _, itl, _ in done]
        speeds[L] = 1.0 / statistics.median(itls)
    short, long_ = [], []
    for _ in range(7):
        short.append(await _stream(client, model, SHORT, 1))
        long_.append(await _stream(client, model, LONG, 1))
    # The fastest of each: the machine is shared, and interference only ever adds time.
    d_ttft = min(t for t, _, _ in long_) - min(t for t, _, _ in short)
    d_tokens = long_[0][2] - short[0][2]
    return speeds, d_ttft / d_tokens


async def test_the_gate_learns_the_real_engine_from_the_shipped_prior(small_engine):
    engine_url, model, seats = small_engine.base_url, small_engine.served_model_name, SEATS
    direct = openai.AsyncOpenAI(base_url=engine_url + "/v1", api_key="x", max_retries=0)
    await _stream(direct, model, LONG, 8)  # warm-up
    # Measured before and after the gate learns (the mean of both), so a shift in the shared
    # machine's load during the test moves the reference with it.
    before = await measure_engine(direct, model, seats)
    sidecar = SidecarServer(SidecarSettings(host="127.0.0.1", port=0, engine_url=engine_url, scrape_interval_s=0.2),
                            config=parse_config(CONFIG.format(seats=seats)))
    await sidecar.start()
    try:
        prior = sidecar.sidecar.gate.policy.model
        prior_speeds, prior_prefill = (prior.speed(1), prior.speed(seats)), prior.per_token
        client = openai.AsyncOpenAI(base_url=sidecar.url + "/v1", api_key="x", max_retries=0)
        sent = 0
        for wave in range(8):  # 8 waves at 1 and at `seats`: 40 requests
            for concurrency in (1, seats):
                prompts = [LONG if (wave + i) % 2 else SHORT for i in range(concurrency)]
                await asyncio.gather(*(_stream(client, model, p, DECODE_TOKENS // 2) for p in prompts))
                sent += concurrency
        assert sent == 40
        policy = sidecar.sidecar.gate.policy
        learned = policy.model
        stats = policy.stats()
        after = await measure_engine(direct, model, seats)
    finally:
        await sidecar.stop()
    speeds = {L: (before[0][L] + after[0][L]) / 2 for L in before[0]}
    prefill = (before[1] + after[1]) / 2
    report = (f"learned speed 1/{seats}: {learned.speed(1):.0f}/{learned.speed(seats):.0f} tok/s, measured "
              f"{speeds[1]:.0f}/{speeds[seats]:.0f} (prior {prior_speeds[0]:.0f}/{prior_speeds[1]:.0f}); "
              f"prefill learned {learned.per_token:.3g} s/token, measured {prefill:.3g} (prior {prior_prefill:.3g}); "
              f"token ratio {stats.extra['prompt_token_ratio']:.2f}; {learned.observations} observations; "
              f"measured before/after: {before}, {after}")
    print(report)
    assert stats.engine_model_observations == learned.observations > 40
    assert learned.speed(1) == pytest.approx(speeds[1], rel=0.25), report
    assert learned.speed(seats) == pytest.approx(speeds[seats], rel=0.25), report
    assert learned.per_token == pytest.approx(prefill, rel=0.25), report
