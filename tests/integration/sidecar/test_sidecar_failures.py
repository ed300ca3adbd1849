"""Every failure case of the sidecar, against the real emulator on loopback."""

import asyncio
import logging
import socket

import aiohttp
import openai
import pytest

from sidecar_support import MODEL, emulator_url, scrape, wait_for

QUEUE_OF_ONE = """
classes:
  - name: batch
    deadline_seconds: 60
default_class: batch
scheduling:
  policy: static
  static_max_concurrency: 1
  max_queue: 1
"""

PAPER_WITH_PRIORITY = """
classes:
  - name: interactive
    deadline_seconds: 1
default_class: interactive
scheduling:
  policy: saber-paper
  engine_priority: true
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(max_tokens=8, stream=False):
    return {"model": MODEL, "prompt": "def f():", "max_tokens": max_tokens, "stream": stream}


async def test_engine_down_gives_503_with_retry_after_and_not_ready(start_sidecar):
    sidecar = await start_sidecar(f"http://127.0.0.1:{closed_port()}")
    async with aiohttp.ClientSession() as s:
        async with s.post(sidecar.url + "/v1/completions", json=body()) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "1"
            assert r.headers["x-saber-outcome"] == "engine_unavailable"
            error = (await r.json())["error"]
            assert "engine is unavailable" in error["message"] and error["code"] == "engine_unavailable"
        async with s.get(sidecar.url + "/readyz") as r:
            assert r.status == 503
        async with s.get(sidecar.url + "/healthz") as r:
            assert r.status == 200


async def test_malformed_json_oversized_and_unknown_class(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator), max_body_bytes=2048)
    async with aiohttp.ClientSession() as s:
        async with s.post(sidecar.url + "/v1/completions", data=b"{not json",
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400
            assert "not valid JSON" in (await r.json())["error"]["message"]
        async with s.post(sidecar.url + "/v1/completions", json={**body(), "prompt": "x" * 5000}) as r:
            assert r.status == 413
            assert "2048 bytes" in (await r.json())["error"]["message"]
        chat = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]}
        async with s.post(sidecar.url + "/v1/chat/completions", json=chat) as r:
            assert r.status == 400
            assert "content[0].text must be a string" in (await r.json())["error"]["message"]
    with pytest.raises(openai.BadRequestError) as err:
        await openai.AsyncOpenAI(base_url=sidecar.url + "/v1", api_key="x", max_retries=0).completions.create(
            model=MODEL, prompt="x", max_tokens=4, extra_headers={"x-saber-sla-class": "gold"})
    assert "valid classes: interactive, batch" in str(err.value)
    metrics = await scrape(sidecar.url)
    assert metrics[("saber_requests_total", (("class", "none"), ("outcome", "bad_request")))] == 4


async def test_queue_full_gives_429_then_disconnects_free_slots(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator), QUEUE_OF_ONE)
    url = sidecar.url + "/v1/completions"
    async with aiohttp.ClientSession() as s:
        running = await s.post(url, json=body(max_tokens=2000, stream=True))
        assert running.status == 200
        await running.content.readline()  # the first event arrived: it runs
        queued = asyncio.create_task(s.post(url, json=body(max_tokens=5)))
        assert await wait_for(lambda: sidecar.sidecar.gate.queued == 1)
        async with s.post(url, json=body()) as r:
            assert r.status == 429
            assert r.headers["x-saber-outcome"] == "queue_full" and r.headers["Retry-After"] == "1"
            assert "queue is full" in (await r.json())["error"]["message"]

        # The queued client goes away: its place in the policy is freed.
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        assert await wait_for(lambda: sidecar.sidecar.gate.queued == 0)

        # The running client goes away mid-stream: the engine's request is aborted and the slot freed.
        assert emulator.engine.num_running == 1
        running.close()
        assert await wait_for(lambda: emulator.engine.num_running == 0)
        assert await wait_for(lambda: sidecar.sidecar.gate.stats().running == 0)

        async with s.post(url, json=body(max_tokens=3)) as r:  # the slot is usable again
            assert r.status == 200 and r.headers["x-saber-outcome"] == "met"
    metrics = await scrape(sidecar.url)
    assert metrics[("saber_requests_total", (("class", "batch"), ("outcome", "queue_full")))] == 1
    assert metrics[("saber_requests_total", (("class", "batch"), ("outcome", "cancelled")))] == 2


async def test_engine_dies_mid_stream_client_gets_an_error(emulator_process, start_sidecar):
    proc, url = emulator_process
    sidecar = await start_sidecar(url)
    client = openai.AsyncOpenAI(base_url=sidecar.url + "/v1", api_key="x", max_retries=0)
    stream = await client.completions.create(model=MODEL, prompt="x", max_tokens=3000, stream=True)
    received = 0
    with pytest.raises(openai.APIError) as err:
        async for _ in stream:
            received += 1
            if received == 3:
                proc.kill()
    assert "engine failed during the stream" in err.value.message
    assert received >= 3
    metrics = await scrape(sidecar.url)
    assert metrics[("saber_requests_total", (("class", "batch"), ("outcome", "error")))] == 1
    assert sidecar.sidecar.gate.stats().running == 0
    assert await wait_for(lambda: not sidecar.sidecar.engine.healthy)
    async with aiohttp.ClientSession() as s, s.get(sidecar.url + "/readyz") as r:
        assert r.status == 503


async def test_demoted_request_goes_to_engine_with_lower_priority(start_emulator, start_sidecar, caplog):
    by_priority = await start_emulator(scheduling_policy="priority")
    demote = {"x-saber-deadline-ms": "5"}  # 8 tokens in 5 ms: beyond the engine's top speed
    caplog.set_level(logging.DEBUG, logger="saber_emulator.server")

    def priorities_seen() -> list[str]:
        # The in-process emulator logs each request it takes, with the priority it got.
        return [r.getMessage().rsplit(" ", 1)[1] for r in caplog.records if "priority" in r.getMessage()]

    async with aiohttp.ClientSession() as s:
        sidecar = await start_sidecar(emulator_url(by_priority), PAPER_WITH_PRIORITY)
        async with s.post(sidecar.url + "/v1/completions", json=body(), headers=demote) as r:
            assert r.status == 200 and r.headers["x-saber-outcome"] == "demoted"
            assert (await r.json())["usage"]["completion_tokens"] == 8
        # An SLA request goes with priority 0, even when the client asks to jump the engine's queue.
        async with s.post(sidecar.url + "/v1/completions", json={**body(), "priority": -100}) as r:
            assert r.status == 200 and r.headers["x-saber-outcome"] == "met"
    assert priorities_seen() == ["10", "0"]  # best_effort_priority defaults to 10
