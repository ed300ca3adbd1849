"""Loopback fixtures: the real emulator (in-process or as a process) and the real sidecar."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from saber_emulator.server import EmulatorServer
from saber_sidecar.server import SidecarServer
from saber_sidecar.settings import SidecarSettings
from sidecar_support import STATIC_CONFIG, emulator_settings


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
