"""The sidecar's engine client (`saber_sidecar.upstream`) against scripted HTTP servers on loopback.

Each server answers with exact bytes, so the framing cases a real engine produces only by chance
(a chunk size line split across reads, a payload split mid-way, trailers, a body ended by
closing, a kept-alive connection the server has closed) happen every time.
"""

import asyncio
import json
import socket
import time

import pytest

from saber_sidecar.upstream import EngineError, EnginePool, EngineTimeout, Sink

pytestmark = pytest.mark.timeout(30)


class Recorder(Sink):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.ended = asyncio.get_running_loop().create_future()

    def on_data(self, data: bytes) -> None:
        self.data.append(data)

    def on_end(self) -> None:
        self.ended.set_result("end")

    def on_error(self, exc: Exception) -> None:
        self.ended.set_result(exc)


async def scripted_server(script):
    """A server whose connections each run `script(reader, writer)`; returns (server, base URL)."""
    server = await asyncio.start_server(script, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    _, sep, rest = head.partition(b"Content-Length: ")
    length = int(rest.split(b"\r\n", 1)[0]) if sep else 0
    return head + await reader.readexactly(length)


async def send_pieces(writer: asyncio.StreamWriter, pieces: list[bytes]) -> None:
    for piece in pieces:  # separate writes with a pause, so they arrive as separate reads
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.01)


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

EVENT = b"data: " + b"x" * 20_000 + b"\n\n"
# Events of 20 kB: 48 MB, more than the sidecar's high-water mark plus the sockets' buffers. Linux
# autotunes a receive buffer up to net.ipv4.tcp_rmem's maximum (32 MB here); with 8 MB the whole
# backlog sometimes fit in the kernel and the engine saw none.
FLOOD = 2400


def flood_script(backed_up: list[int] | None = None):
    """An engine that answers a streamed completion with FLOOD big events at once (and the
    sidecar's /metrics scrapes with an idle engine). With `backed_up`, it then records its own
    write backlog ten times over a second: what it could not send yet."""

    async def script(reader, writer):
        if not (await read_request(reader)).startswith(b"POST"):
            metrics = b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%b" % (len(metrics), metrics))
            writer.close()
            return
        writer.write(HEAD)
        for _ in range(FLOOD):
            writer.write(b"%x\r\n%b\r\n" % (len(EVENT), EVENT))
        done = b"data: [DONE]\n\n"
        writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))
        if backed_up is not None:
            for _ in range(10):
                await asyncio.sleep(0.1)
                backed_up.append(writer.transport.get_write_buffer_size())
        await writer.drain()
        await reader.read()

    return script


async def slow_client(sidecar_url: str, version: str = "1.1"):
    """A client with a 4 kB receive buffer that sends a streamed completion and stops reading."""
    host, port = sidecar_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting, so it sticks
    sock.connect((host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**27)  # the whole flood in one readuntil
    body = b'{"model": "m", "prompt": "p", "max_tokens": 400, "stream": true}'
    writer.write(b"POST /v1/completions HTTP/%b\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%b" % (version.encode(), len(body), body))
    writer.transport.pause_reading()
    return reader, writer



async def test_chunked_body_split_anywhere_is_decoded_exactly():
    pieces = [HEAD + b"7\r\ndata: a", b"\r", b"\n1", b"0;ext=1\r\n", b"data: bbbbbbbbbb\r\n",
              b"0\r\nX-Trailer: t\r\n", b"\r\n"]

    async def script(reader, writer):
        await read_request(reader)
        await send_pieces(writer, pieces)
        await reader.read()  # keep the connection open until the client closes it

    server, url = await scripted_server(script)
    pool = EnginePool(url)
    try:
        resp = await pool.post("/v1/completions", b"{}", {"Content-Type": "application/json"})
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        sink = Recorder()
        resp.attach(sink)
        assert await sink.ended == "end"
        assert b"".join(sink.data) == b"data: a" + b"data: bbbbbbbbbb"
        resp.close()
        assert len(pool._idle) == 1  # complete and keep-alive: back in the pool
    finally:
        await pool.close()
        server.close()


async def test_content_length_and_close_delimited_bodies():
    answers = iter([
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 11\r\n"
        b"Connection: close\r\n\r\n{\"error\":1}",
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"whole\":true}",
    ])

    async def script(reader, writer):
        await read_request(reader)
        answer = next(answers)
        writer.write(answer)
        await writer.drain()
        writer.close()  # HTTP/1.0 without a length: the body ends when the connection does

    server, url = await scripted_server(script)
    pool = EnginePool(url)
    try:
        resp = await pool.post("/v1/completions", b"{}", {})
        assert resp.status == 400 and await resp.read() == b'{"error":1}'
        resp.close()
        assert len(pool._idle) == 0  # Connection: close is honoured
        resp = await pool.post("/v1/completions", b"{}", {})
        assert resp.status == 200 and await resp.read() == b'{"whole":true}'
        resp.close()
        assert len(pool._idle) == 0  # HTTP/1.0 without keep-alive is not reused
    finally:
        await pool.close()
        server.close()


async def test_engine_closing_mid_body_is_an_error_not_an_end():
    async def script(reader, writer):
        await read_request(reader)
        await send_pieces(writer, [HEAD + b"6\r\ndata: \r\n"])
        writer.transport.abort()

    server, url = await scripted_server(script)
    pool = EnginePool(url)
    try:
        resp = await pool.post("/v1/completions", b"{}", {})
        sink = Recorder()
        resp.attach(sink)
        outcome = await sink.ended
        assert isinstance(outcome, EngineError) and "mid-response" in str(outcome)
        assert sink.data == [b"data: "]
    finally:
        await pool.close()
        server.close()


async def test_stale_kept_alive_connection_is_retried_once_on_a_fresh_one():
    requests = []

    async def script(reader, writer):
        requests.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # closes the kept-alive connection right after answering

    server, url = await scripted_server(script)
    pool = EnginePool(url)
    try:
        for _ in range(2):
            resp = await pool.post("/v1/completions", b'{"n":1}', {})
            assert await resp.read() == b"ok"
            resp.close()
            await asyncio.sleep(0.05)
        assert len(requests) == 2  # each request reached the engine exactly once
    finally:
        await pool.close()
        server.close()


async def test_malformed_answers_and_silence_are_clear_errors():
    answers = iter([b"garbage\r\n\r\n", HEAD + b"zz\r\n", None])

    async def script(reader, writer):
        await read_request(reader)
        answer = next(answers)
        if answer is not None:
            writer.write(answer)
            await writer.drain()
        await reader.read()

    server, url = await scripted_server(script)
    pool = EnginePool(url, read_timeout_s=1.0)
    try:
        with pytest.raises(EngineError, match="malformed response .*Expected HTTP"):
            await pool.post("/x", b"{}", {})
        resp = await pool.post("/x", b"{}", {})
        with pytest.raises(EngineError, match="malformed response .*chunk size"):
            await resp.read()
        resp.close()
        with pytest.raises(EngineTimeout, match="sent nothing for 1s"):
            await pool.post("/x", b"{}", {})
    finally:
        await pool.close()
        server.close()


async def test_unreachable_engine_and_header_injection():
    pool = EnginePool("http://127.0.0.1:9", connect_timeout_s=2)
    with pytest.raises(EngineError, match="engine not reachable"):
        await pool.post("/x", b"{}", {})
    head = pool._request_head("/v1/completions", 2, {"x-request-id": "a\r\nEvil: 1", "traceparent": "t"})
    assert b"Evil" not in head and b"traceparent: t\r\n" in head and head.endswith(b"\r\n\r\n")
    await pool.close()


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_slow_client_pauses_the_engine_connection_and_loses_nothing(start_sidecar, version):
    """The sidecar buffers a bounded amount for a client that does not read, then pauses reading
    from the engine; once the client reads, the rest follows and the stream is complete (HTTP/1.1:
    the direct path; HTTP/1.0: the queued one)."""
    from sidecar_support import scrape, wait_for

    server, url = await scripted_server(flood_script())
    sidecar = await start_sidecar(url)
    reader, writer = await slow_client(sidecar.url, version)
    try:
        pool = sidecar.sidecar.pool
        assert await wait_for(lambda: any(not c.transport.is_reading() for c in pool._busy), timeout=10)
        writer.transport.resume_reading()
        if version == "1.1":
            received = await reader.readuntil(b"\r\n0\r\n\r\n")
        else:
            received = await reader.read()  # an HTTP/1.0 response ends with the connection
        assert received.count(b"data: ") == FLOOD + 1 and b"data: [DONE]" in received
        metrics = await scrape(sidecar.url)
        assert metrics[("saber_requests_total", (("class", "batch"), ("outcome", "met")))] == 1
    finally:
        writer.close()
        server.close()


async def test_http10_client_gets_an_unchunked_stream(emulator, start_sidecar):
    """An HTTP/1.0 client cannot take chunked framing: its stream is relayed raw and ends with the
    connection, through the queued path rather than the direct one."""
    from sidecar_support import MODEL, emulator_url

    sidecar = await start_sidecar(emulator_url(emulator))
    host, port = sidecar.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"model": MODEL, "prompt": "p", "max_tokens": 5, "stream": True}).encode()
    writer.write(b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
    answer = await reader.read()  # to EOF: the server closes an HTTP/1.0 response
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower()
    assert payload.count(b"data: ") == 6 and payload.rstrip().endswith(b"data: [DONE]")


async def test_silence_counts_from_the_request_not_from_the_connections_last_use():
    served = 0

    async def script(reader, writer):
        nonlocal served
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            served += 1
            if served == 2:
                await asyncio.sleep(0.3)  # the engine thinks a while
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    server, url = await scripted_server(script)
    pool = EnginePool(url, read_timeout_s=1.0)
    try:
        resp = await pool.post("/x", b"{}", {})
        assert await resp.read() == b"ok"
        resp.close()
        await asyncio.sleep(1.5)  # idle longer than the read timeout, then reused
        pending = asyncio.create_task(pool.post("/x", b"{}", {}))
        await asyncio.sleep(0.1)
        (conn,) = pool._busy
        assert conn.silent_for(time.monotonic()) < 0.5  # not the 1.6 s since its last use
        resp = await pending
        assert await resp.read() == b"ok"
        resp.close()
    finally:
        await pool.close()
        server.close()


async def test_a_broken_answer_on_a_reused_connection_is_not_sent_again():
    """Only a kept-alive connection closed before a single byte came back is retried: a request
    the engine started answering must not run twice."""
    requests = []

    async def script(reader, writer):
        while True:
            try:
                requests.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                return
            if len(requests) == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
            else:
                writer.write(b"HTTP/1.1 200 O")  # half a head, then the engine dies
                await writer.drain()
                writer.transport.abort()
                return

    server, url = await scripted_server(script)
    pool = EnginePool(url)
    try:
        resp = await pool.post("/x", b"{}", {})
        assert await resp.read() == b"ok"
        resp.close()
        with pytest.raises(EngineError, match="before answering"):
            await pool.post("/x", b"{}", {})
        assert len(requests) == 2
    finally:
        await pool.close()
        server.close()


async def test_slow_client_flow_control_under_uvloop(tmp_path):
    """The same slow client against the sidecar as users run it: its own process, on uvloop (the
    default when installed). Seen from the engine: while the client does not read, the engine's
    writes back up (the sidecar stopped reading it) and stay backed up; once the client reads,
    all of it arrives."""
    import re
    import subprocess
    import sys

    pytest.importorskip("uvloop")  # the sidecar extra installs it; the in-process test covers asyncio
    from sidecar_support import STATIC_CONFIG, wait_for

    backed_up: list[int] = []
    server, url = await scripted_server(flood_script(backed_up))
    config = tmp_path / "sidecar.yaml"
    config.write_text(STATIC_CONFIG)
    log = tmp_path / "sidecar.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "saber_cli.main", "sidecar", "--host", "127.0.0.1", "--port", "0",
             "--engine-url", url, "--config", str(config), "--drain-grace", "1"],
            stdout=sink, stderr=subprocess.STDOUT,
            env={**__import__("os").environ, "SABER_SIDECAR_EVENT_LOOP": "uvloop"})
    try:
        assert await wait_for(lambda: "saber sidecar listening on http" in log.read_text(), timeout=20)
        sidecar_url = re.search(r"saber sidecar listening on (http://\S+)", log.read_text()).group(1)
        reader, writer = await slow_client(sidecar_url)
        assert await wait_for(lambda: len(backed_up) == 10, timeout=15)
        # 8 MB on its way: the sidecar stopped reading the engine once its high-water mark and
        # the sockets' buffers were full, so the engine's own backlog stays put for a second (with
        # no flow control the sidecar would read it all into its memory and the backlog would be 0).
        assert min(backed_up) > 0 and len(set(backed_up)) == 1, backed_up
        writer.transport.resume_reading()
        received = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 20)
        assert received.count(b"data: ") == FLOOD + 1 and b"data: [DONE]" in received
        writer.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        server.close()


async def test_bytes_after_a_response_never_pass_for_the_next_one():
    """An engine that sends more than one response's worth (in the same read, or later on the
    idle connection): the extra bytes are nobody's answer, so the connection is not reused and
    the next request gets its own response on a fresh one."""
    requests = []

    async def script(reader, writer):
        while True:
            try:
                requests.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                return
            if len(requests) == 1:  # an answer and a stray second one in the same write
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                             b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
            elif len(requests) == 2:  # an answer, then stray bytes while the connection is idle
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
                await writer.drain()
                await asyncio.sleep(0.1)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nthree")
            await writer.drain()

    server, url = await scripted_server(script)
    pool = EnginePool(url)
    try:
        resp = await pool.post("/x", b"{}", {})
        assert await resp.read() == b"ok"
        resp.close()
        assert not pool._idle  # the stray response came with it: not reused
        resp = await pool.post("/x", b"{}", {})
        assert await resp.read() == b"two"
        resp.close()
        assert len(pool._idle) == 1
        await asyncio.sleep(0.3)  # the stray bytes arrive on the idle connection
        assert not pool._idle
        resp = await pool.post("/x", b"{}", {})
        assert await resp.read() == b"three"
        resp.close()
        assert len(requests) == 3
    finally:
        await pool.close()
        server.close()
