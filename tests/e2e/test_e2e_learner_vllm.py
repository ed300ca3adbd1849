"""The gate learns the real engine it runs on: vLLM (CPU build, a small random-weight Llama).

The session's tiny model (2 layers, 128 wide) is so fast that HTTP and the API server, not the
engine, set its times, and its prefill is nearly free; this test builds a larger one (6 layers,
768 wide, 42M parameters: ~18 ms a decode step, like a small model on a CPU) and serves it with
its own vLLM server (max_num_seqs 4).

The sidecar starts from the shipped prior (the paper's GPU curve, 5e-5 s per prompt token), a
bounded number of requests go through it at two concurrencies with short and long prompts, and
its learned engine model is compared with an independent measurement of the same engine taken
directly (no sidecar): per-request decode speed at batch 1 and 4 (the engine's `max_num_seqs`;
at 4 with the gate's own mix of long and short prompts, whose KV context slows a decode step),
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

from saber_bench.vllm_cpu import VLLMServer, fetch_metrics_text, find_vllm_python, sample_value
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


async def _stream(client, model, prompt, max_tokens, gaps=None):
    """(ttft, inter-token seconds over the decode span, prompt tokens) of one streamed completion;
    each gap between tokens is appended to `gaps` when given."""
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
            if gaps is not None and last is not None:
                gaps.append(now - last)
            first = first or now
            last = now
    return first - sent, (last - first) / max(1, usage.completion_tokens - 1), usage.prompt_tokens


async def measure_wave(client, model, seats, itls, prefills, mixed=None):
    """One round of direct measurement (no sidecar): inter-token times at batch 1 and `seats`,
    and one back-to-back pair of TTFTs, long against short prompt, for the prefill cost."""
    for L in (1, seats):
        done = await asyncio.gather(*(_stream(client, model, SHORT, DECODE_TOKENS) for _ in range(L)))
        itls.setdefault(L, []).extend(itl for _, itl, _ in done)
        if mixed is not None:
            # The gate's own mix (long and short prompts together): the median gap between tokens
            # (the few steps that prefill a long prompt are outliers in it).
            gaps: list[float] = []
            await asyncio.gather(*(_stream(client, model, LONG if i % 2 else SHORT, DECODE_TOKENS, gaps)
                                   for i in range(L)))
            if L == 1:
                await _stream(client, model, LONG, DECODE_TOKENS, gaps)
            mixed.setdefault(L, []).append(statistics.median(gaps))
    # The prefill cost from the engine's own prefill timer (vllm:request_prefill_time_seconds:
    # scheduled to first token), for 3 long and 3 short prompts: no HTTP or client jitter in it.
    means, tokens = [], []
    for prompt in (LONG, SHORT):
        before = await asyncio.to_thread(_prefill_timer, client.base_url)
        for _ in range(3):
            tokens.append((await _stream(client, model, prompt, 1))[2])
        after = await asyncio.to_thread(_prefill_timer, client.base_url)
        means.append((after[0] - before[0]) / (after[1] - before[1]))
    prefills.append((means[0] - means[1]) / (tokens[0] - tokens[-1]))


def _prefill_timer(base_url) -> tuple[float, float]:
    text = fetch_metrics_text(str(base_url).rstrip("/").removesuffix("/v1"))
    return (sample_value(text, "vllm:request_prefill_time_seconds_sum"),
            sample_value(text, "vllm:request_prefill_time_seconds_count"))


async def test_the_gate_learns_the_real_engine_from_the_shipped_prior(small_engine):
    engine_url, model, seats = small_engine.base_url, small_engine.served_model_name, SEATS
    direct = openai.AsyncOpenAI(base_url=engine_url + "/v1", api_key="x", max_retries=0)
    await _stream(direct, model, LONG, 8)  # warm-up
    sidecar = SidecarServer(SidecarSettings(host="127.0.0.1", port=0, engine_url=engine_url, scrape_interval_s=0.2),
                            config=parse_config(CONFIG.format(seats=seats)))
    await sidecar.start()
    itls: dict[int, list[float]] = {}
    mixed: dict[int, list[float]] = {}
    prefills: list[float] = []
    try:
        prior = sidecar.sidecar.gate.policy.model
        prior_speeds, prior_prefill = (prior.speed(1), prior.speed(seats)), prior.per_token
        client = openai.AsyncOpenAI(base_url=sidecar.url + "/v1", api_key="x", max_retries=0)
        sent = 0
        # Waves through the sidecar at 1 and at `seats`, short and long prompts, 40 requests, with
        # a direct measurement between them: the machine is shared, so the reference is taken
        # under the same (changing) load as what the gate learned from.
        for wave in range(8):
            for concurrency in (1, seats):
                prompts = [LONG if (wave + i) % 2 else SHORT for i in range(concurrency)]
                await asyncio.gather(*(_stream(client, model, p, DECODE_TOKENS // 2) for p in prompts))
                sent += concurrency
            if wave % 2:
                await measure_wave(direct, model, seats, itls, prefills, mixed)
        assert sent == 40
        policy = sidecar.sidecar.gate.policy
        learned = policy.model
        stats = policy.stats()
    finally:
        await sidecar.stop()
    speeds = {L: 1.0 / statistics.median(v) for L, v in itls.items()}
    mixed_speeds = {L: 1.0 / statistics.median(v) for L, v in mixed.items()}
    prefill = statistics.median(prefills)
    report = (f"learned speed 1/{seats}: {learned.speed(1):.0f}/{learned.speed(seats):.0f} tok/s, measured "
              f"{speeds[1]:.0f}/{speeds[seats]:.0f} (prior {prior_speeds[0]:.0f}/{prior_speeds[1]:.0f}); "
              f"prefill learned {learned.per_token:.3g} s/token, measured {prefill:.3g} (prior {prior_prefill:.3g}; "
              f"samples {[f'{x:.2g}' for x in prefills]}); token ratio {stats.extra['prompt_token_ratio']:.2f}; "
              f"{learned.observations} observations; measured with the gate's prompt mix "
              f"{mixed_speeds[1]:.0f}/{mixed_speeds[seats]:.0f}")
    print(report)
    assert stats.engine_model_observations == learned.observations > 40
    assert learned.speed(1) == pytest.approx(speeds[1], rel=0.25), report
    # At the engine's full batch the learned speed came out 9-28% below the short-prompt
    # measurement across runs: not a learning bias but the KV context. Half the gate's requests
    # carry ~1,860-token prompts, and a decode step among them is slower than among short ones;
    # the model (t0 + t1 L + t2 L^2 + c P) has no context term, so it learns the speed of the
    # traffic it serves. Measured directly with that same mix it is within 4-15% (2026-12-03).
    assert learned.speed(seats) == pytest.approx(mixed_speeds[seats], rel=0.25), report
    assert abs(learned.speed(seats) - speeds[seats]) < abs(prior_speeds[1] - speeds[seats]), report
    assert learned.per_token == pytest.approx(prefill, rel=0.25), report
