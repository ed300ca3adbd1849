"""The `saber` policy behind the real proxy: online refit from relayed completions, and rejection."""

import asyncio

import aiohttp
import openai

from sidecar_support import MODEL, emulator_url, scrape

SABER = """
classes:
  - name: interactive
    deadline_seconds: 1
    on_miss: reject
    output_tokens: 1000  # a stated length: max_tokens is read strictly (a class that states none explores first)
  - name: batch
    deadline_seconds: 60
default_class: batch
scheduling:
  policy: saber
  speed_model:
    min_samples: 4
    window: 16
    refit_every: 4
"""


async def test_speed_model_refits_from_completions(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator), SABER)
    client = openai.AsyncOpenAI(base_url=sidecar.url + "/v1", api_key="x", max_retries=0)

    async def one(i):
        stream = await client.completions.create(model=MODEL, prompt="x", max_tokens=10 + 2 * i, stream=True)
        return sum([1 async for c in stream if c.choices and c.choices[0].text])

    for wave in range(3):  # different concurrency levels give the fit something to explain
        counts = await asyncio.gather(*(one(i) for i in range(4 * (wave + 1))))
        assert counts == [10 + 2 * i for i in range(4 * (wave + 1))]
    await asyncio.sleep(0.05)
    stats = sidecar.sidecar.gate.stats()
    assert stats.extra["speed_model_refits"] >= 1
    metrics = await scrape(sidecar.url)
    assert ("saber_speed_model_r2", ()) in metrics
    assert metrics[("saber_predicted_speed_tokens_per_second", ())] > 0
    assert metrics[("saber_requests_total", (("class", "batch"), ("outcome", "met")))] == 24


async def test_hopeless_request_of_reject_class_gets_429(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator), SABER)
    async with aiohttp.ClientSession() as s:
        async with s.post(sidecar.url + "/v1/completions",
                          json={"model": MODEL, "prompt": "x", "max_tokens": 1000},
                          headers={"x-saber-sla-class": "interactive"}) as r:
            assert r.status == 429
            assert r.headers["x-saber-outcome"] == "rejected" and int(r.headers["Retry-After"]) >= 1
            assert "cannot meet its deadline" in (await r.json())["error"]["message"]


async def test_each_streamed_first_token_reaches_the_policy_before_its_finish(emulator, start_sidecar):
    """The relay tells the gate when a request's first token arrives (saber grows its slow-start
    cap from it); once per admitted request, while it is still running."""
    sidecar = await start_sidecar(emulator_url(emulator), SABER)
    policy = sidecar.sidecar.gate.policy
    events: list[tuple[str, str]] = []
    first_token, finished = policy.first_token, policy.finished

    def on_first(request_id, now):
        events.append(("first", request_id))
        return first_token(request_id, now)

    def on_finish(request_id, *args, **kw):
        events.append(("finish", request_id))
        return finished(request_id, *args, **kw)

    policy.first_token, policy.finished = on_first, on_finish
    client = openai.AsyncOpenAI(base_url=sidecar.url + "/v1", api_key="x", max_retries=0)

    async def one():
        stream = await client.completions.create(model=MODEL, prompt="x", max_tokens=8, stream=True)
        return sum([1 async for c in stream if c.choices and c.choices[0].text])

    assert await asyncio.gather(*(one() for _ in range(12))) == [8] * 12
    await asyncio.sleep(0.05)
    ids = {rid for _, rid in events}
    assert len(ids) == 12
    for rid in ids:
        mine = [kind for kind, r in events if r == rid]
        assert mine == ["first", "finish"]
