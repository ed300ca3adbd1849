"""Config hot reload, and SIGTERM draining of a sidecar process."""

import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from sidecar_support import MODEL, STATIC_CONFIG, emulator_url, scrape, wait_for

WITH_GOLD = STATIC_CONFIG.replace("default_class: batch", """  - name: gold
    deadline_seconds: 3
default_class: gold""").replace("policy: static", "policy: saber-paper")


async def post(url, headers=None, **extra):
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4, **extra},
                          headers=headers or {}) as r:
            return r.status, dict(r.headers), await r.text()


async def test_bad_reload_keeps_last_good_config_and_good_reload_applies(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator))
    path = Path(sidecar.settings.config_path)
    key = ("saber_config_reloads_total", (("result", "failure"),))

    path.write_text(STATIC_CONFIG.replace("deadline_seconds: 60", "deadline_seconds: -60"))
    assert await wait_for(lambda: sidecar.watcher.last_error is not None)
    assert (await scrape(sidecar.url))[key] == 1
    status, headers, _ = await post(sidecar.url)
    assert status == 200 and headers["x-saber-class"] == "batch" and headers["x-saber-deadline-ms"] == "60000"

    path.write_text(WITH_GOLD)
    assert await wait_for(lambda: sidecar.sidecar.gate.config.default_class == "gold")
    status, headers, _ = await post(sidecar.url, {"x-saber-sla-class": "gold"})
    assert status == 200 and headers["x-saber-class"] == "gold"
    status, headers, _ = await post(sidecar.url)
    assert headers["x-saber-class"] == "gold"
    assert sidecar.sidecar.gate.policy.name == "saber-paper"  # scheduling changed: a new policy instance
    metrics = await scrape(sidecar.url)
    assert metrics[("saber_config_reloads_total", (("result", "success"),))] == 1
    assert metrics[key] == 1


async def test_sigterm_finishes_in_flight_then_exits(emulator, tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text(STATIC_CONFIG)
    log = tmp_path / "sidecar.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "saber_cli.main", "sidecar", "--host", "127.0.0.1", "--port", "0",
             "--engine-url", emulator_url(emulator), "--config", str(config), "--drain-grace", "20"],
            stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        assert await wait_for(lambda: "saber sidecar listening on http" in log.read_text(), timeout=20)
        url = re.search(r"saber sidecar listening on (http://\S+)", log.read_text()).group(1)
        async with aiohttp.ClientSession() as s:
            stream = await s.post(url + "/v1/completions",
                                  json={"model": MODEL, "prompt": "x", "max_tokens": 60, "stream": True})
            assert stream.status == 200
            first = await stream.content.readline()
            assert first.startswith(b"data:")
            proc.send_signal(signal.SIGTERM)
            assert await wait_for(lambda: "draining" in log.read_text())
            async with s.get(url + "/readyz") as r:
                assert r.status == 503
            async with s.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
                assert "shutting down" in (await r.json())["error"]["message"]
            rest = await stream.read()  # the in-flight stream runs to its end
            assert rest.rstrip().endswith(b"data: [DONE]")
            assert rest.count(b"data:") >= 59
        assert await wait_for(lambda: proc.poll() is not None, timeout=15)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
