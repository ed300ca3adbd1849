"""Clients that give up, through the sidecar, in front of real vLLM (CPU build): the engine aborts
their requests (its running count returns to 0 and none of them finishes: vLLM's
`vllm:request_success_total` does not move, and it generated far fewer tokens than asked), and the
sidecar holds no connection for them.

The report this pins: a non-streamed request abandoned by its client (`curl -m 0.2`) kept the
engine generating for nobody and its connection busy in the sidecar's pool for good.
"""

import asyncio
import urllib.request

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from saber_sidecar.config import parse_config
from saber_sidecar.server import SidecarServer
from saber_sidecar.settings import SidecarSettings

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

CONFIG = """
classes:
  - name: batch
    deadline_seconds: 600
default_class: batch
scheduling:
  policy: static
  static_max_concurrency: 64
"""


def engine_gauges(base_url: str) -> dict[str, float]:
    """running, waiting, finished and generated tokens so far, from the engine's own /metrics."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {"running": 0.0, "waiting": 0.0, "finished": 0.0, "generated": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm:num_requests_running":
                out["running"] += s.value
            elif s.name == "vllm:num_requests_waiting":
                out["waiting"] += s.value
            elif s.name == "vllm:request_success_total":
                out["finished"] += s.value
            elif s.name == "vllm:generation_tokens_total":
                out["generated"] += s.value
    return out


async def gauges(base_url: str) -> dict[str, float]:
    return await asyncio.to_thread(engine_gauges, base_url)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_abandoned_requests_are_aborted_by_vllm(vllm_server, stream):
    engine_url, model = vllm_server.base_url, vllm_server.model
    sidecar = SidecarServer(SidecarSettings(host="127.0.0.1", port=0, engine_url=engine_url, scrape_interval_s=0.2),
                            config=parse_config(CONFIG))
    await sidecar.start()
    n = vllm_server.max_num_seqs
    try:
        before = await gauges(engine_url)
        assert before["running"] == 0
        # Long enough that the engine would be busy for a long while on its own (ignore_eos).
        body = {"model": model, "prompt": "def f():", "max_tokens": 1500, "stream": stream, "ignore_eos": True}

        async def give_up(s: aiohttp.ClientSession) -> None:
            try:
                async with asyncio.timeout(60):
                    async with s.post(sidecar.url + "/v1/completions", json=body) as r:
                        await r.read()
            except TimeoutError:
                pass

        async with aiohttp.ClientSession() as s:
            clients = [asyncio.create_task(give_up(s)) for _ in range(n)]
            # Wait until the engine runs all of them, then every client gives up.
            for _ in range(300):
                if (await gauges(engine_url))["running"] == n:
                    break
                await asyncio.sleep(0.1)
            assert (await gauges(engine_url))["running"] == n, "the engine never ran the requests"
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
        for _ in range(100):
            after = await gauges(engine_url)
            if after["running"] == 0:
                break
            await asyncio.sleep(0.1)
        assert after["running"] == 0 and after["waiting"] == 0, after
        # Aborted, not run to the end: none finished, and far fewer tokens than the 1500 each asked for.
        assert after["finished"] == before["finished"], (before, after)
        assert after["generated"] - before["generated"] < n * 1500 / 2, (before, after)
        assert not sidecar.sidecar.pool._busy  # no connection held for a request nobody wants
        assert sidecar.sidecar.gate.stats().running == 0
    finally:
        await sidecar.stop()
