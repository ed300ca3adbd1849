"""What a probe of the sidecar found, pinned: client mistakes that were 500s (and went uncounted),
connections a client could hold for an hour, a log line with a traceback per malformed request,
and the per-request SLO headers of llm-d and inference-perf. Real sidecar, real emulator or a
scripted engine on loopback; raw sockets where a client must misbehave byte by byte."""

import asyncio
import json
import logging
import socket
import struct
import time

import aiohttp
import pytest

from sidecar_support import MODEL, emulator_url, scrape, wait_for

pytestmark = pytest.mark.timeout(60)

SABER_REJECT = """
classes:
  - name: interactive
    deadline_seconds: 30
    on_miss: reject
default_class: interactive
scheduling:
  policy: saber
"""


def count(metrics, cls, outcome) -> float:
    return metrics.get(("saber_requests_total", (("class", cls), ("outcome", outcome))), 0)


def assert_openai_error(payload: dict, code: str) -> None:
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and error["message"]


async def test_client_mistakes_that_were_500s_are_counted_4xx(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator))
    url = sidecar.url + "/v1/completions"
    nested = b'{"model": "m", "prompt": "p", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=nested, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400, await r.text()
            payload = await r.json()
            assert_openai_error(payload, "invalid_json")
            assert "too deeply" in payload["error"]["message"]
            assert r.headers["x-saber-reject-reason"] == "invalid_json"
        for value in ("1e-300", "0.5", "inf", "nan", "-3"):
            async with s.post(url, json={"model": MODEL, "prompt": "p", "max_tokens": 2},
                              headers={"x-saber-deadline-ms": value}) as r:
                assert r.status == 400, (value, await r.text())
                assert_openai_error(await r.json(), "invalid_deadline")
    metrics = await scrape(sidecar.url)
    assert count(metrics, "none", "bad_request") == 6


async def test_client_reset_while_the_response_head_is_written_is_a_counted_disconnect(start_sidecar, caplog):
    """The engine's head and the client's reset reach the sidecar in one turn of its loop: the
    handler resumes to write the response head to a transport that is already closing."""
    client = socket.socket()
    done = asyncio.Event()

    async def engine(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"POST"):  # the sidecar's scrape of /metrics
            text = b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(text), text))
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        # The client resets its connection (SO_LINGER 0: an RST) in the same instant.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        await asyncio.sleep(0.2)
        done.set()
        await reader.read()

    server = await asyncio.start_server(engine, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sidecar = await start_sidecar(f"http://127.0.0.1:{port}")
    caplog.set_level(logging.INFO)
    try:
        host, sport = sidecar.url.removeprefix("http://").split(":")
        client.connect((host, int(sport)))
        body = b'{"model": "m", "prompt": "p", "max_tokens": 4, "stream": true}'
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        await asyncio.wait_for(done.wait(), 10)
        assert await wait_for(lambda: sidecar.sidecar.gate.stats().running == 0)
        metrics = await scrape(sidecar.url)
        assert count(metrics, "batch", "cancelled") == 1
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    finally:
        server.close()


def raw_client(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed the socket within `seconds`, and what it sent before."""
    sock.settimeout(0.1)
    got = b""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, got
        if not data:
            return True, got
        got += data
    return False, got


async def test_slowloris_head_is_cut_off_by_the_header_timeout(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator), header_timeout_s=0.5)
    sock = raw_client(sidecar.url)
    try:
        start = time.monotonic()
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-A: "
        closed = False
        for byte in head:  # a byte every 50 ms: never a whole head
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            await asyncio.sleep(0.05)
        if not closed:
            closed, _ = await asyncio.to_thread(closed_within, sock, 3.0)
        assert closed and time.monotonic() - start < 3.0
    finally:
        sock.close()
    assert sidecar.limits.header_timeouts == 1
    metrics = await scrape(sidecar.url)
    assert metrics[("saber_client_connections_closed_total", (("reason", "header_timeout"),))] == 1
    # A client that sends its head in time is served as before.
    async with aiohttp.ClientSession() as s, s.get(sidecar.url + "/healthz") as r:
        assert r.status == 200


async def test_trickled_head_gets_a_408_in_the_openai_shape(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator), header_timeout_s=0.3)
    sock = raw_client(sidecar.url)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        closed, got = await asyncio.to_thread(closed_within, sock, 3.0)
    finally:
        sock.close()
    assert closed and got.startswith(b"HTTP/1.1 408")
    assert_openai_error(json.loads(got.partition(b"\r\n\r\n")[2]), "header_timeout")


async def test_idle_kept_alive_connection_is_closed(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator), idle_timeout_s=0.5)
    sock = raw_client(sidecar.url)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        closed, got = await asyncio.to_thread(closed_within, sock, 3.0)
    finally:
        sock.close()
    assert got.startswith(b"HTTP/1.1 200") and closed  # answered, kept alive, then closed when idle


async def test_connection_cap_refuses_with_503_and_recovers(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator), max_connections=3)
    held = [raw_client(sidecar.url) for _ in range(3)]
    try:
        assert await wait_for(lambda: len(sidecar.limits.open) == 3)
        extra = raw_client(sidecar.url)
        closed, got = await asyncio.to_thread(closed_within, extra, 3.0)
        extra.close()
        assert closed and got.startswith(b"HTTP/1.1 503")
        assert_openai_error(json.loads(got.partition(b"\r\n\r\n")[2]), "too_many_connections")
        assert sidecar.limits.refused == 1
    finally:
        for sock in held:
            sock.close()
    assert await wait_for(lambda: len(sidecar.limits.open) == 0)
    async with aiohttp.ClientSession() as s, s.get(sidecar.url + "/healthz") as r:
        assert r.status == 200
    metrics = await scrape(sidecar.url)
    assert metrics[("saber_client_connections_closed_total", (("reason", "connection_cap"),))] == 1
    assert metrics[("saber_client_connections", ())] == 1  # the scrape's own connection


async def test_malformed_http_is_a_counted_openai_4xx_without_a_log_flood(emulator, start_sidecar, caplog):
    sidecar = await start_sidecar(emulator_url(emulator))
    caplog.set_level(logging.DEBUG)
    answers = []
    for garbage in [b"GARBAGE\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                    b"POST /v1/completions HTTP/1.1\r\nBad Header\r\n\r\n",
                    b"GET /healthz HTTP/1.1\r\nX-Huge: " + b"a" * 10_000 + b"\r\n\r\n",
                    b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"] * 3:
        sock = raw_client(sidecar.url)
        try:
            sock.sendall(garbage)
            _, got = await asyncio.to_thread(closed_within, sock, 3.0)
        finally:
            sock.close()
        answers.append(got)
    for got in answers:
        assert got.split(b" ", 2)[1] == b"400", got[:80]
        assert_openai_error(json.loads(got.partition(b"\r\n\r\n")[2]), "invalid_http")
    lines = [r for r in caplog.records if "malformed HTTP" in r.getMessage() or "Error handling" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None  # one line for 15 bad requests, no traceback
    assert not [r for r in caplog.records if r.exc_info]
    metrics = await scrape(sidecar.url)
    assert count(metrics, "none", "bad_request") == 15


async def test_broken_chunked_request_body_is_a_counted_400(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator))
    sock = raw_client(sidecar.url)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\nzz\r\n")
        _, got = await asyncio.to_thread(closed_within, sock, 3.0)
    finally:
        sock.close()
    assert got.split(b" ", 2)[1] == b"400", got[:200]
    # aiohttp's parser finds the bad chunk size (invalid_http) before the handler reads the body.
    error = json.loads(got.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] in ("invalid_http", "invalid_body") and "chunk" in error["message"].lower()
    metrics = await scrape(sidecar.url)
    assert count(metrics, "none", "bad_request") == 1


@pytest.mark.parametrize("header", ["x-llm-d-slo-tpot-ms", "x-slo-tpot-ms", "x-saber-tpot-ms"])
async def test_ecosystem_tpot_header_sets_the_target_and_a_rejection_says_why(emulator, start_sidecar, header):
    sidecar = await start_sidecar(emulator_url(emulator), SABER_REJECT)
    url = sidecar.url + "/v1/completions"
    body = {"model": MODEL, "prompt": "p", "max_tokens": 32}
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body) as r:  # the class alone: easily met
            assert r.status == 200 and r.headers["x-saber-outcome"] == "met"
            assert "x-saber-reject-reason" not in r.headers
        # 1 ms per token: 1,000 tokens/s for one stream, far beyond the emulated engine.
        async with s.post(url, json=body, headers={header: "1"}) as r:
            assert r.status == 429, await r.text()
            payload = await r.json()
            assert_openai_error(payload, "sla_unattainable")
            assert r.headers["x-saber-reject-reason"] == "sla_unattainable"
            assert r.headers["x-llm-d-request-dropped-reason"] == "sla_unattainable"
    metrics = await scrape(sidecar.url)
    assert count(metrics, "interactive", "rejected") == 1


async def test_ecosystem_ttft_header_counts_a_late_first_token_as_missed(emulator, start_sidecar):
    sidecar = await start_sidecar(emulator_url(emulator))  # static: admits everything
    url = sidecar.url + "/v1/completions"
    body = {"model": MODEL, "prompt": "p", "max_tokens": 4, "stream": True}
    async with aiohttp.ClientSession() as s:
        for headers in ({"x-llm-d-slo-ttft-ms": "1"}, {"x-slo-ttft-ms": "60000"}, {}):
            async with s.post(url, json=body, headers=headers) as r:
                assert r.status == 200
                await r.read()
        async with s.post(url, json=body, headers={"x-slo-ttft-ms": "0"}) as r:
            assert r.status == 400
            assert_openai_error(await r.json(), "invalid_slo")
            assert r.headers["x-llm-d-request-dropped-reason"] == "invalid_slo"
    metrics = await scrape(sidecar.url)
    # The emulator's first token takes a prefill step (~20 ms): 1 ms is missed, 60 s is met.
    assert count(metrics, "batch", "missed") == 1 and count(metrics, "batch", "met") == 2
