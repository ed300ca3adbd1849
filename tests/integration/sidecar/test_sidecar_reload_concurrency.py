"""A reload that lowers the gate's limit with requests in flight: the new limit holds at the engine.

Counted where it matters: the engine's own running count (the emulator's engine, sampled every
few milliseconds), across a config reload from a static cap of 8 to 3 with 8 running and more
queued. Before the fix, the new policy started with nothing running and admitted 3 more at once
(engine running 11).
"""

import asyncio
from pathlib import Path

import aiohttp

from sidecar_support import MODEL, STATIC_CONFIG, emulator_url, wait_for

CAP8 = STATIC_CONFIG.replace("static_max_concurrency: 64", "static_max_concurrency: 8")
CAP3 = STATIC_CONFIG.replace("static_max_concurrency: 64", "static_max_concurrency: 3")


async def test_a_lowered_limit_holds_across_a_reload_with_requests_in_flight(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator), CAP8)
    engine = emulator.engine
    samples: list[tuple[bool, int]] = []  # (reloaded yet, engine running)
    reloaded = False

    async def sample():
        while True:
            samples.append((reloaded, engine.num_running))
            await asyncio.sleep(0.005)

    async with aiohttp.ClientSession() as s:

        async def one():
            async with s.post(sidecar.url + "/v1/completions",
                              json={"model": MODEL, "prompt": "x", "max_tokens": 120}) as r:
                await r.read()
                return r.status

        sampler = asyncio.create_task(sample())
        tasks = [asyncio.create_task(one()) for _ in range(16)]
        assert await wait_for(lambda: engine.num_running == 8 and sidecar.sidecar.gate.queued == 8)
        Path(sidecar.settings.config_path).write_text(CAP3)
        assert await wait_for(lambda: sidecar.sidecar.gate.config.scheduling.static_max_concurrency == 3)
        reloaded = True
        statuses = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        sampler.cancel()
    assert statuses == [200] * 16
    after = [n for done, n in samples if done]
    assert max(after) <= 8  # nothing more was admitted while the 8 drained
    first_low = next(i for i, n in enumerate(after) if n <= 3)
    assert max(after[first_low:]) <= 3, after  # and from then on the new cap holds at the engine
    assert sidecar.sidecar.gate.policy.stats().running == 0
