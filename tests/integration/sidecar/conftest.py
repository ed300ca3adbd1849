"""Loopback fixtures: the real emulator (in-process or as a process) and the real sidecar."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from saber_emulator.engine import EngineConfig, OutputLengthConfig
from saber_emulator.server import EmulatorServer, EmulatorSettings
from saber_sidecar.server import SidecarServer
from saber_sidecar.settings import SidecarSettings

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


@pytest.fixture
async def emulator():
    server = EmulatorServer(emulator_settings())
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def start_emulator():
    started = []

    async def start(**engine) -> EmulatorServer:
        server = EmulatorServer(emulator_settings(**engine))
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


def emulator_url(server: EmulatorServer) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def start_sidecar(tmp_path):
    started: list[SidecarServer] = []

    async def start(engine_url: str, config_text: str = STATIC_CONFIG, **settings) -> SidecarServer:
        path = tmp_path / f"sidecar-{len(started)}.yaml"
        path.write_text(config_text)
        values = dict(host="127.0.0.1", port=0, engine_url=engine_url, config_path=str(path),
                      reload_interval_s=0.1, scrape_interval_s=0.1)
        values.update(settings)
        server = SidecarServer(SidecarSettings(**values))
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
def emulator_process():
    """The emulator as its own process (so a test can kill it); yields (process, base URL)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "saber_cli.main", "emulator", "--host", "127.0.0.1", "--port", "0",
         "--output-len-dist", "max"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = None
        for line in proc.stdout:  # the emulator prints its URL once listening
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                url = found.group(1)
                break
        assert url, "emulator did not start"
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


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
