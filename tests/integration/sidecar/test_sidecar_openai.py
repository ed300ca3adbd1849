"""openai client -> sidecar -> emulator on loopback, streaming and not."""

import asyncio

import aiohttp
import openai

from sidecar_support import MODEL, emulator_url, scrape


def client(sidecar) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sidecar.url + "/v1", api_key="unused", max_retries=0)


async def test_completion_not_streamed_reports_final_outcome(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator))
    raw = await client(sidecar).completions.with_raw_response.create(model=MODEL, prompt="def add(a, b):", max_tokens=8)
    completion = raw.parse()
    assert completion.usage.completion_tokens == 8 and completion.choices[0].text
    assert raw.headers["x-saber-outcome"] == "met"
    assert raw.headers["x-saber-class"] == "batch"
    assert raw.headers["x-saber-deadline-ms"] == "60000"
    metrics = await scrape(sidecar.url)
    assert metrics[("saber_requests_total", (("class", "batch"), ("outcome", "met")))] == 1
    assert metrics[("saber_sla_attainment_ratio", (("class", "batch"),))] == 1.0


async def test_chat_streamed_chunk_by_chunk_with_alias_class(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator))
    raw = await client(sidecar).chat.completions.with_raw_response.create(
        model="coder-fast", messages=[{"role": "user", "content": "write fizzbuzz"}], max_tokens=12, stream=True)
    assert raw.headers["x-saber-outcome"] == "admitted"
    assert raw.headers["x-saber-class"] == "interactive"
    pieces = [c.choices[0].delta.content async for c in raw.parse() if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 12  # one chunk per token arrived separately
    assert await wait_for_metric(sidecar, ("saber_requests_total", (("class", "interactive"), ("outcome", "met"))))
    metrics = await scrape(sidecar.url)
    assert metrics[("saber_time_to_first_token_seconds_count", (("class", "interactive"),))] == 1


async def wait_for_metric(sidecar, key) -> bool:
    """The final outcome is recorded as the stream ends, a moment after the client read [DONE]."""
    for _ in range(100):
        if (await scrape(sidecar.url)).get(key, 0) >= 1:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_completion_stream_with_usage_and_explicit_deadline(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator))
    raw = await client(sidecar).completions.with_raw_response.create(
        model=MODEL, prompt="x", max_tokens=5, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-saber-sla-class": "interactive", "x-saber-deadline-ms": "2500"})
    assert raw.headers["x-saber-deadline-ms"] == "2500"
    chunks = [c async for c in raw.parse()]
    assert chunks[-1].usage.completion_tokens == 5
    assert "".join(c.choices[0].text for c in chunks if c.choices)


async def test_models_relayed(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator))
    models = await client(sidecar).models.list()
    assert [m.id for m in models.data] == [MODEL]


async def test_health_ready_and_speed_model_metrics(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator))
    async with aiohttp.ClientSession() as s:
        for path in ("/healthz", "/readyz"):
            async with s.get(sidecar.url + path) as r:
                assert r.status == 200, path
    metrics = await scrape(sidecar.url)
    assert metrics[("saber_admission_limit", ())] == 64
    assert ("saber_goodput_requests_per_second", ()) in metrics
    assert metrics[("saber_config_reloads_total", (("result", "failure"),))] == 0
