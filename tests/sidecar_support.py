"""Helpers shared by the sidecar tests (integration and e2e): kept out of conftest.py so that
importing them never depends on which conftest pytest loaded first."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from saber_emulator.engine import EngineConfig, OutputLengthConfig
from saber_emulator.server import EmulatorServer, EmulatorSettings

MODEL = "Qwen/Qwen2.5-Coder-3B-Instruct"

STATIC_CONFIG = """
classes:
  - name: interactive
    deadline_seconds: 5
    model_aliases: [coder-fast]
  - name: batch
    deadline_seconds: 60
default_class: batch
scheduling:
  policy: static
  static_max_concurrency: 64
"""


def emulator_settings(**engine) -> EmulatorSettings:
    # Every request produces exactly max_tokens, so token counts can be checked.
    return EmulatorSettings(host="127.0.0.1", port=0, model=MODEL,
                            engine=EngineConfig(output_len=OutputLengthConfig(kind="max"), **engine))


def emulator_url(server: EmulatorServer) -> str:
    return f"http://127.0.0.1:{server.port}"


async def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


async def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """A server's /metrics as {(sample name, sorted labels): value}."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    return {(x.name, tuple(sorted(x.labels.items()))): x.value
            for f in text_string_to_metric_families(text) for x in f.samples}
