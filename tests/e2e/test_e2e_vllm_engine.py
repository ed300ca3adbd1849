"""The real vLLM engine (CPU build) as a client sees it: the OpenAI SDK and /metrics.

These pin down the engine behaviour saber relies on: exact token budgets with ignore_eos, usage
reporting, streaming, the Prometheus metric names the sidecar reads, and priority scheduling.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from saber_bench.vllm_cpu import fetch_metrics_text, metric_families, sample_value

pytestmark = pytest.mark.vllm

PROMPT = "def fibonacci(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"

# What the sidecar reads, newest name first (older vLLM releases used the later ones).
ENGINE_GAUGES = {
    "running": ["vllm:num_requests_running"],
    "waiting": ["vllm:num_requests_waiting"],
    "kv_cache_usage": ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
}


@pytest.fixture
def client(vllm_server) -> OpenAI:
    return OpenAI(base_url=vllm_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _post_json(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_models_lists_the_served_name(client, vllm_server):
    ids = [m.id for m in client.models.list().data]
    assert ids == [vllm_server.model]


def test_completion_ignore_eos_gives_exactly_max_tokens(client, vllm_server):
    resp = client.completions.create(model=vllm_server.model, prompt=PROMPT, max_tokens=24,
                                     temperature=0.0, extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 24
    # The prompt count is the trained tokenizer's, as /tokenize reports it.
    tokenized = _post_json(vllm_server.base_url + "/tokenize",
                           {"model": vllm_server.model, "prompt": PROMPT})
    assert resp.usage.prompt_tokens == tokenized["count"] > 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 24
    assert isinstance(resp.choices[0].text, str) and resp.choices[0].text


def test_completion_streaming_reports_usage(client, vllm_server):
    stream = client.completions.create(
        model=vllm_server.model, prompt=PROMPT, max_tokens=17, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    text_chunks, usage, finish = [], None, None
    for chunk in stream:
        if chunk.choices:
            text_chunks.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None and usage.completion_tokens == 17
    assert finish == "length"
    # Streaming is incremental: many chunks, not one blob at the end.
    assert sum(1 for t in text_chunks if t) >= 5


def test_without_ignore_eos_max_tokens_is_an_upper_bound(client, vllm_server):
    resp = client.completions.create(model=vllm_server.model, prompt=PROMPT, max_tokens=12,
                                     n=1, seed=1234)
    assert 1 <= resp.usage.completion_tokens <= 12
    assert resp.choices[0].finish_reason in ("length", "stop")


def test_chat_completion_uses_the_chat_template(client, vllm_server):
    content = "Write a function that reverses a string."
    resp = client.chat.completions.create(
        model=vllm_server.model, messages=[{"role": "user", "content": content}],
        max_tokens=9, extra_body={"ignore_eos": True})
    msg = resp.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert resp.usage.completion_tokens == 9
    bare = _post_json(vllm_server.base_url + "/tokenize",
                      {"model": vllm_server.model, "prompt": content})["count"]
    # bos + role tags + end marker wrap the message.
    assert resp.usage.prompt_tokens > bare


def test_chat_completion_streaming(client, vllm_server):
    stream = client.chat.completions.create(
        model=vllm_server.model, messages=[{"role": "user", "content": "Sort a list in Python."}],
        max_tokens=11, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None and usage.completion_tokens == 11
    assert len(pieces) >= 5


def test_request_over_the_context_length_is_a_400(client, vllm_server):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=vllm_server.model, prompt=PROMPT, max_tokens=100_000)
    assert "max" in str(err.value).lower()


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=4)


def test_metrics_names_types_and_generation_counter(client, vllm_server):
    families = {f["name"]: f for f in metric_families(fetch_metrics_text(vllm_server.base_url))}
    for role, names in ENGINE_GAUGES.items():
        found = [n for n in names if n in families]
        assert found, f"no metric for {role} among {names}"
        assert families[found[0]]["type"] == "gauge"
    # prometheus_client names a counter family without its _total suffix.
    assert families["vllm:generation_tokens"]["type"] == "counter"
    assert "vllm:generation_tokens_total" in families["vllm:generation_tokens"]["samples"]
    assert families["vllm:e2e_request_latency_seconds"]["type"] == "histogram"

    before = sample_value(fetch_metrics_text(vllm_server.base_url), "vllm:generation_tokens_total")
    client.completions.create(model=vllm_server.model, prompt=PROMPT, max_tokens=21,
                              extra_body={"ignore_eos": True})
    after = sample_value(fetch_metrics_text(vllm_server.base_url), "vllm:generation_tokens_total")
    assert before is not None and after is not None
    assert after - before >= 21


async def _wait_metric(base_url: str, sample: str, at_least: float, tasks: list[asyncio.Task],
                       timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        for task in tasks:  # a request that failed early would otherwise show up as a timeout
            if task.done() and task.exception() is not None:
                raise task.exception()
        value = sample_value(await asyncio.to_thread(fetch_metrics_text, base_url), sample)
        if value is not None and value >= at_least:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{sample} stayed at {value}, expected >= {at_least}")
        await asyncio.sleep(0.05)


async def _stream_done_at(client: AsyncOpenAI, model: str, max_tokens: int, priority: int) -> float:
    stream = await client.completions.create(
        model=model, prompt=PROMPT, max_tokens=max_tokens, stream=True,
        extra_body={"ignore_eos": True, "priority": priority})
    async for _ in stream:
        pass
    return time.monotonic()


async def test_priority_policy_serves_urgent_waiting_request_first(vllm_server):
    """With --scheduling-policy priority, a lower `priority` value jumps the waiting queue.

    Fill every running slot with long requests (the shortest ends first and frees one slot),
    queue three priority-10 requests, then one priority-0 request. FCFS would run it last;
    the priority scheduler must run it first, so it finishes before all three.
    """
    url, model, slots = vllm_server.base_url, vllm_server.model, vllm_server.max_num_seqs
    async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        longs = [asyncio.create_task(_stream_done_at(client, model, n, priority=5))
                 for n in [400] + [1500] * (slots - 1)]
        try:
            await _wait_metric(url, "vllm:num_requests_running", slots, longs)
            lows = []
            for _ in range(3):
                lows.append(asyncio.create_task(_stream_done_at(client, model, 8, priority=10)))
            await _wait_metric(url, "vllm:num_requests_waiting", 3, longs + lows)
            urgent = asyncio.create_task(_stream_done_at(client, model, 8, priority=0))
            await _wait_metric(url, "vllm:num_requests_waiting", 4, longs + lows + [urgent])
            assert not longs[0].done(), "the first long request ended before the queue was set up"
            urgent_done = await urgent
            lows_done = await asyncio.gather(*lows)
        finally:
            for task in longs:
                task.cancel()  # closing the stream makes vLLM abort the request
            await asyncio.gather(*longs, return_exceptions=True)
    assert all(urgent_done < t for t in lows_done)
    # The aborted long requests leave the engine: nothing stays running or waiting.
    await _wait_idle(url)


async def _wait_idle(base_url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        text = await asyncio.to_thread(fetch_metrics_text, base_url)
        running = sample_value(text, "vllm:num_requests_running")
        waiting = sample_value(text, "vllm:num_requests_waiting")
        if running == 0 and waiting == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle: running={running} waiting={waiting}")
        await asyncio.sleep(0.1)
