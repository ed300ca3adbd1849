"""A client that gives up: the engine's request is aborted and its connection released, whether
the client was waiting for a whole (non-streamed) answer or reading a stream.

Against the real emulator on loopback: its `num_running` is the engine's own count, so a request
the sidecar forgot to abort shows there (the report this pins: 10 abandoned non-streamed requests
left 10 running in the engine and 10 connections open for good, while the gate counted 0).
"""

import asyncio

import aiohttp
import pytest

from sidecar_support import MODEL, emulator_url, scrape, wait_for

pytestmark = pytest.mark.timeout(60)


async def abandon(url: str, stream: bool, after_s: float = 0.2) -> None:
    """Send a long completion and give up after `after_s`, as `curl -m 0.2` does."""
    body = {"model": MODEL, "prompt": "def f():", "max_tokens": 300, "stream": stream}
    async with aiohttp.ClientSession() as s:
        try:
            async with asyncio.timeout(after_s):
                async with s.post(url + "/v1/completions", json=body) as r:
                    await r.read()
        except TimeoutError:
            pass


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_abandoned_requests_are_aborted_in_the_engine_and_release_their_connection(
        start_emulator, start_sidecar, stream):
    # 300 tokens at 20 ms a step: 6 s of work each, far longer than the client waits.
    emulator = await start_emulator()
    sidecar = await start_sidecar(emulator_url(emulator))
    await asyncio.gather(*(abandon(sidecar.url, stream) for _ in range(10)))
    pool = sidecar.sidecar.pool
    # The engine aborted every request and the sidecar holds no connection for them: well before
    # the 6 s the engine would need to finish them on its own.
    assert await wait_for(lambda: emulator.engine.num_running == 0, timeout=2.0), emulator.engine.num_running
    assert await wait_for(lambda: not pool._busy, timeout=2.0), len(pool._busy)
    assert sidecar.sidecar.gate.stats().running == 0
    metrics = await scrape(sidecar.url)
    assert metrics[("saber_requests_total", (("class", "batch"), ("outcome", "cancelled")))] == 10
