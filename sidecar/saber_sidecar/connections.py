"""Client connections of the sidecar: how long they may live, how many there may be, how a
malformed request is answered, and the write flow control the stream relay listens to.

aiohttp parses the requests and runs the handlers; what it does not bound is added here, around
its `RequestHandler` (one `ConnectionGuard` per accepted socket, a thin asyncio.Protocol that
forwards every call):
- **header timeout**: a request head must be complete within `header_timeout_s` of its first
  byte (of the connection being accepted, for the first request), or the connection gets a 408
  and is closed (slowloris: aiohttp alone waits up to its keep-alive timeout, an hour by default,
  for a head trickled a byte at a time);
- **idle timeout**: a kept-alive connection with no request in progress is closed after
  `idle_timeout_s` (aiohttp's keep-alive timeout, set from the setting);
- **connection cap**: past `max_connections` open connections a new one gets a 503 at once and
  is closed, so sockets and memory stay bounded whatever clients do;
- **malformed HTTP**: answered with a 4xx in the OpenAI error shape, counted, and logged as one
  line at most every few seconds (aiohttp logs a traceback per bad request: a log flood);
- **flow control**: the transport's `pause_writing` / `resume_writing` set and clear a flag and
  tell a listener (the stream relay pauses and resumes the engine's connection), as uvicorn's
  `flow_control.py` does; nothing polls the write buffer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web

from saber_sidecar.errors import error_response, openai_error_bytes

log = logging.getLogger(__name__)

BAD_HTTP_LOG_EVERY_S = 10.0  # at most one log line per this many seconds for malformed requests


class FlowListener(Protocol):
    def client_paused(self) -> None: ...

    def client_resumed(self) -> None: ...


class FlowControl:
    """The write side of one client connection: `paused` while the transport's buffer is above
    its high-water mark; a listener (at most one, the stream being relayed) hears each change."""

    __slots__ = ("listener", "paused", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.paused = False
        self.listener: FlowListener | None = None

    def set_limits(self, high: int, low: int) -> None:
        self.transport.set_write_buffer_limits(high=high, low=low)

    def pause_writing(self) -> None:
        self.paused = True
        if self.listener is not None:
            self.listener.client_paused()

    def resume_writing(self) -> None:
        self.paused = False
        if self.listener is not None:
            self.listener.client_resumed()


def flow_control_of(transport: asyncio.BaseTransport | None) -> FlowControl | None:
    """The flow control of a connection the sidecar's server accepted (None for any other)."""
    if transport is None:
        return None
    guard = transport.get_protocol()
    return guard.flow if isinstance(guard, ConnectionGuard) else None


class _QuietLog:
    """One line at most every BAD_HTTP_LOG_EVERY_S, saying how many were not logged."""

    def __init__(self) -> None:
        self._last = -float("inf")
        self._suppressed = 0

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last < BAD_HTTP_LOG_EVERY_S:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more since the last line)" if self._suppressed else ""
        self._last, self._suppressed = now, 0
        log.warning("%s%s", message, more)


class SidecarRequestHandler(web.RequestHandler):
    """aiohttp's handler, answering requests it cannot parse in the OpenAI error shape, counting
    them (`on_bad_request(status)`) and logging them quietly; a 500 (a bug of ours) keeps its
    traceback in the log but is answered in the same shape."""

    def __init__(self, manager: web.Server, *, on_bad_request: Callable[[int], None], quiet_log: _QuietLog,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._on_bad_request = on_bad_request
        self._quiet_log = quiet_log

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a response is already on its way; aiohttp closes
            return super().handle_error(request, status, exc, message)
        self._on_bad_request(status)
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            resp = error_response(500, "the sidecar failed on this request; retry, and report it if it persists",
                                  "internal_error")
        else:
            reason = (message or str(exc) or "malformed request").splitlines()[0][:200]
            self._quiet_log.warning(f"malformed HTTP request from {request.remote}: {reason}")
            resp = error_response(status, f"malformed HTTP request ({reason}); send a valid HTTP/1.1 request",
                                  "invalid_http")
        resp.force_close()
        return resp


class ConnectionGuard(asyncio.Protocol):
    """Wraps aiohttp's handler for one connection: header timeout, the connection cap, and the
    write flow control. Every protocol call is forwarded."""

    def __init__(self, inner: web.RequestHandler, limits: ConnectionLimits) -> None:
        self.inner = inner
        self.limits = limits
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
        self.refused = False
        self.busy = False  # a request's head has been read and its handler has not returned
        self._timer: asyncio.TimerHandle | None = None
        self._got_bytes = False

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        limits = self.limits
        if len(limits.open) >= limits.max_connections:
            self.refused = True
            limits.refused += 1
            body = openai_error_bytes(503, f"the sidecar has {limits.max_connections} connections open, its limit; "
                                      "retry shortly, or reuse a kept-alive connection", "too_many_connections")
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"  # type: ignore[attr-defined]
                            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            transport.close()
            return
        limits.open.add(self)
        self.flow = FlowControl(self.transport)  # type: ignore[arg-type]
        self.inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        self._got_bytes = True
        if not self.busy and self._timer is None:
            self._arm()  # the first byte of the next request on a kept-alive connection
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.refused:
            return None
        self.inner.eof_received()  # aiohttp's handler returns None: the transport closes itself
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.refused:
            return
        self.limits.open.discard(self)
        if self.flow is not None:
            self.flow.listener = None
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.refused:
            return
        self.inner.pause_writing()
        assert self.flow is not None
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        if self.refused:
            return
        self.inner.resume_writing()
        assert self.flow is not None
        self.flow.resume_writing()

    # -- the request's progress (from the middleware) -------------------------------------------

    def request_started(self) -> None:
        self.busy = True
        self._disarm()

    def request_done(self) -> None:
        self.busy = False

    # -- the header timer ------------------------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(self.limits.header_timeout_s, self._head_too_slow)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_too_slow(self) -> None:
        self._timer = None
        transport = self.transport
        if self.busy or transport is None or transport.is_closing():
            return
        self.limits.header_timeouts += 1
        if self._got_bytes:  # a head was on its way: say why the connection ends
            body = openai_error_bytes(408, f"request head not received within {self.limits.header_timeout_s:g}s",
                                      "header_timeout")
            transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
                            b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        transport.close()


class ConnectionLimits:
    """The limits every guard of one server shares, and what they have counted."""

    def __init__(self, header_timeout_s: float, max_connections: int) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.open: set[ConnectionGuard] = set()
        self.refused = 0  # connections turned away at the cap
        self.header_timeouts = 0  # connections closed for a head that did not arrive in time


class ConnectionCollector:
    """`saber_client_connections` (open now) and `saber_client_connections_closed_total{reason}`
    (closed by the sidecar: `header_timeout`, `connection_cap`), read from the limits at scrape
    time; register it on the sidecar's registry."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily("saber_client_connections", "Client connections open now.",
                                value=len(self.limits.open))
        closed = CounterMetricFamily("saber_client_connections_closed", "Client connections the sidecar closed "
                                     "itself: a head not received in time, or over the connection cap.",
                                     labels=["reason"])
        closed.add_metric(["header_timeout"], self.limits.header_timeouts)
        closed.add_metric(["connection_cap"], self.limits.refused)
        yield closed


@web.middleware
async def track_requests(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    """Tells the connection's guard that a request's head has arrived (the header timer stops)
    and when its handler is done (the next request's head is timed from its first byte)."""
    transport = request.transport
    guard = transport.get_protocol() if transport is not None else None
    if not isinstance(guard, ConnectionGuard):
        return await handler(request)
    guard.request_started()
    try:
        return await handler(request)
    finally:
        guard.request_done()


class GuardedSite(web.TCPSite):
    """A TCP site whose connections are each served by a `SidecarRequestHandler` inside a
    `ConnectionGuard`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, limits: ConnectionLimits,
                 handler_kwargs: dict[str, Any], on_bad_request: Callable[[int], None], backlog: int = 2048) -> None:
        super().__init__(runner, host, port, backlog=backlog)
        self.limits = limits
        self._handler_kwargs = handler_kwargs
        self._on_bad_request = on_bad_request

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        quiet = _QuietLog()

        def accept() -> ConnectionGuard:
            inner = SidecarRequestHandler(server, loop=loop, on_bad_request=self._on_bad_request, quiet_log=quiet,
                                          **self._handler_kwargs)
            return ConnectionGuard(inner, self.limits)

        self._server = await loop.create_server(accept, self._host, self._port, backlog=self._backlog)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port
