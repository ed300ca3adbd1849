"""The sidecar's HTTP/1.1 client for the engine's completion endpoints: a keep-alive pool whose
connections hand each response body to a sink as the bytes arrive.

Why not aiohttp's client here: at 200 streams the engine ends a step by writing one chunk to
every stream at once, and the sidecar must relay that burst before the next. aiohttp's client
wakes the handler task once per chunk and only after every socket of the burst has been read,
so a chunk waits for the whole burst. Here the connection's `data_received` decodes the chunked
framing and gives each piece to the sink at once, which (`relay.py`) writes it to the client in
the same callback: the burst is relayed socket by socket, at about half the CPU per chunk.

The HTTP/1.1 parsing is llhttp's (`httptools`, Node's parser, as uvicorn uses it); this module
keeps only the connection logic: the pool, the retry of a stale keep-alive, timeouts, and
dropping a connection whose request nobody wants any more (so the engine aborts it). Bodies are
chunked, sized by Content-Length, or ended by the connection closing; requests carry a
Content-Length.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

import httptools

MAX_HEAD_BYTES = 64 * 1024


class EngineError(Exception):
    """The engine could not be reached, broke the protocol, or went silent."""


class EngineTimeout(EngineError):
    """The engine sent nothing for longer than the read timeout."""


class EngineClosed(EngineError):
    """The engine closed the connection before answering anything."""


class Sink:
    """Receives one response's body; every method is called on the event loop, in order."""

    def on_data(self, data: bytes) -> None:
        raise NotImplementedError

    def on_end(self) -> None:
        raise NotImplementedError

    def on_error(self, exc: Exception) -> None:
        raise NotImplementedError


class _Collect(Sink):
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def on_data(self, data: bytes) -> None:
        self.parts.append(data)

    def on_end(self) -> None:
        if not self.done.done():
            self.done.set_result(b"".join(self.parts))

    def on_error(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


class Response:
    """A response whose head has arrived; its body goes to the sink given to `attach`."""

    def __init__(self, conn: _Connection, status: int, headers: dict[str, str]) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers
        self.content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()

    def attach(self, sink: Sink) -> None:
        self._conn.attach(sink)

    async def read(self) -> bytes:
        sink = _Collect()
        self.attach(sink)
        return await sink.done

    def pause_reading(self) -> None:
        self._conn.pause_reading()

    def resume_reading(self) -> None:
        self._conn.resume_reading()

    def close(self) -> None:
        """Done with it: a finished connection goes back to the pool, an unfinished one is dropped,
        which is how the engine learns that the client went away."""
        self._conn.finish_with()


class _Connection(asyncio.Protocol):
    """One connection to the engine; it carries one request at a time.

    The response is parsed by llhttp (`httptools`, as uvicorn does), fed from `data_received`;
    its callbacks hand each piece of the body to the sink in that same call. A fresh parser per
    request: anything after the response's end is a protocol error, never the next response.
    """

    def __init__(self, pool: EnginePool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.last_read = time.monotonic()
        self._reset()

    def _reset(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[Response] | None = None
        self._head_bytes = 0  # bytes received while the head was incomplete (bounded by MAX_HEAD_BYTES)
        self._header_bytes = 0  # names and values of the head's headers (bounded the same way)
        self._header_list: list[tuple[bytes, bytes]] = []
        self._sink: Sink | None = None
        self._pending: list[bytes] = []  # body bytes that arrived before a sink was attached
        self._ended = False
        self._error: Exception | None = None
        self._until_close = False  # the body ends when the engine closes (no length, not chunked)
        self._keep_alive = True
        self._in_body = False
        self._got_bytes = False

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        self._got_bytes = True
        if self._ended or self._error is not None:
            # Bytes after the response's end (or after an error): this connection is not reused.
            self._keep_alive = False
            return
        if self._head is None and not self._in_body:
            # Bytes on an idle kept-alive connection answer nothing we sent: never let them pass
            # for the next request's response.
            self.abandon()
            return
        if not self._in_body:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._ended:
                self._keep_alive = False  # the response was whole; what followed it was not ours
                return
            reason = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
            self._protocol_error(f"engine sent a malformed response ({reason or type(exc).__name__})")
            return
        if not self._in_body and self._head_bytes > MAX_HEAD_BYTES:  # a head that never ends
            self._protocol_error("engine response head is too large")

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost says whether the body was complete

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self._in_body and self._until_close and not self._ended and self._error is None:
            self._end()
            return
        if self._head is not None and not self._head.done():
            # Only a connection closed with not a byte answered may be retried (a stale keep-alive).
            kind = EngineError if self._got_bytes else EngineClosed
            self._head.set_exception(kind(f"engine closed the connection before answering ({exc or 'EOF'})"))
        elif self._in_body and not self._ended and self._error is None:
            self._fail(EngineError(f"engine closed the connection mid-response ({exc or 'EOF'})"))

    # -- llhttp callbacks (inside feed_data) -----------------------------------------------------

    def on_message_begin(self) -> None:
        if self._in_body:  # a second response to one request
            raise EngineError("engine sent more than one response")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Counted here too: a whole oversized head can arrive in one read.
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEAD_BYTES:
            raise EngineError("engine response head is too large")
        self._header_list.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._header_list = []  # an interim response: the real one follows
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1").strip()
                   for name, value in self._header_list}
        self._header_list = []
        self._keep_alive = self._parser.should_keep_alive()
        te = headers.get("transfer-encoding", "").lower()
        self._until_close = ("chunked" not in te and "content-length" not in headers
                             and status not in (204, 304))
        if self._until_close:
            self._keep_alive = False
        self._in_body = True
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(Response(self, status, headers))

    def on_body(self, body: bytes) -> None:
        if self._sink is not None:
            self._sink.on_data(body)
        else:
            self._pending.append(body)

    def on_message_complete(self) -> None:
        if self._in_body:  # not the end of an interim (1xx) response
            self._keep_alive = self._keep_alive and self._parser.should_keep_alive()
            self._end()

    # -- request/response ------------------------------------------------------------------------

    def send(self, head: bytes, body: bytes) -> asyncio.Future[Response]:
        self._reset()
        self.last_read = time.monotonic()  # silence counts from the request, not from the last use
        self._head = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(head + body)
        return self._head

    def _end(self) -> None:
        self._ended = True
        if self._sink is not None:
            self._sink.on_end()

    def _fail(self, exc: Exception) -> None:
        self._error = exc
        self._keep_alive = False
        if self._sink is not None:
            self._sink.on_error(exc)

    def _protocol_error(self, message: str) -> None:
        self._fail(EngineError(message))
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(EngineError(message))
        self.abandon()

    def attach(self, sink: Sink) -> None:
        self._sink = sink
        pending, self._pending = self._pending, []
        for data in pending:
            sink.on_data(data)
        if self._ended:
            sink.on_end()
        elif self._error is not None:
            sink.on_error(self._error)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def finish_with(self) -> None:
        self._sink = None
        if self._ended and self._keep_alive and not self.closed and self._error is None:
            self._reset()
            self.pool.release(self)
        else:
            self.abandon()

    def abandon(self) -> None:
        """Drop the connection now: the engine sees it close and aborts whatever it was running
        for it (vLLM and the emulator both do); the pool forgets it at once."""
        self.pool.forget(self)
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def silent_for(self, now: float) -> float:
        busy = self._head is not None or (self._in_body and not self._ended)
        return now - self.last_read if busy else 0.0

    def time_out(self, silence_s: float) -> None:
        exc = EngineTimeout(f"engine sent nothing for {silence_s:g}s")
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(exc)
        elif not self._ended:
            self._fail(exc)
        self.abandon()


class EnginePool:
    """Keep-alive connections to one engine (`base_url`), at most `max_idle` kept open idle."""

    def __init__(self, base_url: str, max_idle: int = 1024, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 600.0, idle_timeout_s: float = 60.0) -> None:
        url = urlsplit(base_url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.host_header = url.netloc
        self.max_idle = max_idle
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._idle: dict[_Connection, float] = {}  # idle connection -> since when; the newest is reused first
        self._busy: set[_Connection] = set()
        self._watchdog: asyncio.Task | None = None

    async def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> Response:
        """Send a POST and wait for the response head (the body follows through `Response.attach`)."""
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        head = self._request_head(path, len(body), headers)
        conn, reused = await self._acquire()
        try:
            return await self._send(conn, head, body)
        except EngineClosed:
            if not reused:
                raise
        # A kept-alive connection the engine had just closed: one retry on a fresh connection
        # (nothing was answered, so nothing can have been run twice).
        conn = await self._connect()
        self._busy.add(conn)
        return await self._send(conn, head, body)

    @staticmethod
    async def _send(conn: _Connection, head: bytes, body: bytes) -> Response:
        try:
            return await conn.send(head, body)
        except BaseException:
            # Cancelled (the client gave up) or failed before the head: the connection is dropped
            # at once, so the engine stops generating for nobody and the pool holds nothing for it.
            conn.abandon()
            raise

    def _request_head(self, path: str, length: int, headers: Mapping[str, str]) -> bytes:
        lines = [f"POST {path} HTTP/1.1", f"Host: {self.host_header}", f"Content-Length: {length}"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                continue  # never let a header value start another header
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")

    async def _acquire(self) -> tuple[_Connection, bool]:
        """A connection for one request, and whether it is a kept-alive one."""
        while self._idle:
            conn, _ = self._idle.popitem()
            if not conn.closed:
                self._busy.add(conn)
                return conn, True
        conn = await self._connect()
        self._busy.add(conn)
        return conn, False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port, ssl=self.ssl),
                self.connect_timeout_s,
            )
        except TimeoutError:
            raise EngineError(f"could not connect to the engine within {self.connect_timeout_s:g}s") from None
        except OSError as exc:
            raise EngineError(f"engine not reachable ({type(exc).__name__}: {exc})") from None
        return conn

    def release(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        if len(self._idle) >= self.max_idle:
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
            return
        self._idle[conn] = time.monotonic()

    def forget(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        self._idle.pop(conn, None)

    async def _watch(self) -> None:
        """Once a second: time out silent engines, close connections idle too long."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for conn in list(self._busy):
                if conn.silent_for(now) > self.read_timeout_s:
                    conn.time_out(self.read_timeout_s)
            for conn, since in list(self._idle.items()):
                if now - since > self.idle_timeout_s:
                    self.forget(conn)
                    conn.closed = True
                    if conn.transport is not None:
                        conn.transport.close()

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        for conn in [*self._idle, *self._busy]:
            conn.closed = True
            if conn.transport is not None:
                conn.transport.abort()
        self._idle.clear()
        self._busy.clear()
