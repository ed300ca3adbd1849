"""The sidecar in front of real vLLM (CPU build, tiny random-weight Llama).

Requests stream through the sidecar, the sidecar reads the engine's real `vllm:*` metrics, and
the saber policy's speed model refits from real completions.
"""

import asyncio

import openai
import pytest

from saber_sidecar.config import parse_config
from saber_sidecar.server import SidecarServer
from saber_sidecar.settings import SidecarSettings

pytestmark = pytest.mark.vllm

CONFIG = """
classes:
  - name: batch
    deadline_seconds: 600
default_class: batch
scheduling:
  policy: saber
  speed_model:
    min_samples: 4
    window: 16
    refit_every: 4
"""


async def test_sidecar_streams_reads_vllm_metrics_and_refits(vllm_server):
    engine_url, model = vllm_server.base_url, vllm_server.model
    sidecar = SidecarServer(SidecarSettings(host="127.0.0.1", port=0, engine_url=engine_url, scrape_interval_s=0.2),
                            config=parse_config(CONFIG))
    await sidecar.start()
    try:
        state = sidecar.sidecar.engine
        assert state.healthy, state.last_error  # the real vllm:* names parsed
        client = openai.AsyncOpenAI(base_url=sidecar.url + "/v1", api_key="x", max_retries=0)

        async def one(max_tokens: int) -> int:
            stream = await client.completions.create(model=model, prompt="def fib(n):", max_tokens=max_tokens,
                                                     stream=True, stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True})
            usage = [c.usage async for c in stream if c.usage is not None]
            return usage[-1].completion_tokens

        for concurrency in (1, 2, 3, 4):  # the engine runs at most 4 (E2E_MAX_NUM_SEQS)
            counts = await asyncio.gather(*(one(8 + i) for i in range(concurrency)))
            assert counts == [8 + i for i in range(concurrency)]
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body={"ignore_eos": True})
        assert raw.headers["x-saber-outcome"] in ("met", "missed")
        assert raw.parse().usage.completion_tokens == 4

        stats = sidecar.sidecar.gate.stats()
        assert stats.extra["speed_model_refits"] >= 1
        assert stats.speed_model_r2 is not None
        snap = await sidecar.scraper.scrape_once()
        # Every request has finished: the real engine's gauges say it is idle.
        assert snap.healthy and snap.running == 0 and snap.waiting == 0 and 0.0 <= snap.kv_cache_usage <= 1.0
    finally:
        await sidecar.stop()
