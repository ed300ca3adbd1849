"""One admitted request's trip to the engine and back: the request body the engine gets, the relay
of its answer (streamed chunk by chunk as it arrives, or whole), its token count and its outcome.

Streams are relayed without parsing each chunk: output tokens are counted from the SSE `data:`
events (or taken from `usage` when the client asked for it), and the time of the first chunk is
the time to first token.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from saber_sidecar import metrics as m
from saber_sidecar.classify import Classified
from saber_sidecar.connections import FlowControl, flow_control_of
from saber_sidecar.errors import Fail
from saber_sidecar.policy.base import Request
from saber_sidecar.upstream import (
    EngineError,
    EnginePool,
    EngineTimeout,
    Response,
    Sink,
)

if TYPE_CHECKING:
    from saber_sidecar.driver import Gate
    from saber_sidecar.metrics import SidecarMetrics
    from saber_sidecar.settings import SidecarSettings

log = logging.getLogger(__name__)

ADMITTED = "admitted"  # header value for a stream whose final outcome is not known yet
FORWARDED_HEADERS = ("authorization", "x-request-id", "traceparent")


@dataclass(frozen=True, slots=True)
class RelayContext:
    """What a relay needs from the sidecar, handed in explicitly (the relay never sees the proxy)."""

    gate: Gate
    metrics: SidecarMetrics
    pool: EnginePool
    settings: SidecarSettings
    engine_model: Callable[[], Awaitable[str | None]]  # the engine's model name, for alias requests


class Relay:
    """One admitted request's trip to the engine and back."""

    def __init__(self, sc: RelayContext, request: web.Request, req: Request, raw: bytes, body: dict,
                 classified: Classified, best_effort: bool) -> None:
        self.sc, self.request, self.req, self.raw, self.body = sc, request, req, raw, body
        self.classified, self.best_effort = classified, best_effort
        self.tokens = 0
        # Only a response relayed to its natural end is a complete output; anything cut off (client
        # gone, engine error) reaches the policy with completed=False and the tokens it did produce.
        self.completed = False
        self.first_token_at: float | None = None
        self.prompt_tokens: int | None = None  # the engine's count, from `usage` when it came back
        self.admitted_at = sc.gate.now()

    def _headers(self, outcome: str) -> dict[str, str]:
        req = self.req
        return {
            "x-saber-outcome": outcome,
            "x-saber-class": req.sla_class,
            "x-saber-deadline-ms": str(round((req.deadline - req.arrival) * 1000)),
            "x-saber-queue-ms": f"{(self.admitted_at - req.arrival) * 1000:.1f}",
            "x-saber-request-id": req.id,
        }

    def _final_outcome(self, end: float) -> str:
        req = self.req
        if self.best_effort:
            return m.DEMOTED
        if end > req.deadline:
            return m.MISSED
        if req.ttft_deadline is not None and self.first_token_at is not None and self.first_token_at > req.ttft_deadline:
            return m.MISSED
        if req.tpot_target is not None and self.first_token_at is not None and self.tokens > 1:
            if (end - self.first_token_at) / (self.tokens - 1) > req.tpot_target:
                return m.MISSED
        return m.MET

    def _record(self, outcome: str, end: float) -> None:
        ttft = self.first_token_at - self.req.arrival if self.first_token_at is not None else None
        self.sc.metrics.record(self.req.sla_class, outcome, end - self.req.arrival, ttft)

    async def _engine_body(self) -> bytes:
        sc, body = self.sc, self.body
        changed = False
        if self.classified.alias:
            model = await sc.engine_model()
            if model is not None and body.get("model") != model:
                body["model"] = model
                changed = True
        # The gate owns the engine's priority: a client-sent value would let it jump the engine's
        # queue past the gate, so it is always replaced (or removed when priority is not in use).
        if sc.gate.config.scheduling.engine_priority:
            wanted = sc.settings.best_effort_priority if self.best_effort else 0
            if body.get("priority") != wanted:
                body["priority"] = wanted
                changed = True
        elif "priority" in body:
            del body["priority"]
            changed = True
        if not changed:
            return self.raw
        try:
            return json.dumps(body).encode()
        except RecursionError:  # a body nested about as deep as the parser allows
            raise Fail(400, "request body nests JSON too deeply; send a flatter JSON object", m.BAD_REQUEST,
                       "invalid_json") from None

    async def run(self) -> web.StreamResponse:
        sc, settings = self.sc, self.sc.settings
        data = await self._engine_body()
        headers = forward_headers(self.request)
        headers["Content-Type"] = "application/json"
        try:
            upstream = await sc.pool.post(self.request.path, data, headers)
        except EngineTimeout:
            raise Fail(504, "engine did not answer in time", m.ERROR, "engine_timeout", settings.retry_after_s) from None
        except EngineError as exc:
            raise Fail(503, f"{exc}; retry later", m.ENGINE_UNAVAILABLE, "engine_unavailable",
                       settings.retry_after_s) from None
        except asyncio.CancelledError:
            # The client gave up while the engine was still working on a whole answer: the pool has
            # dropped the connection (the engine aborts the request); counted like any disconnect.
            self._record(m.CANCELLED, sc.gate.now())
            raise
        try:
            if upstream.status != 200:
                return await self._relay_error(upstream)
            if upstream.content_type == "text/event-stream":
                return await self._relay_stream(upstream)
            return await self._relay_whole(upstream)
        except asyncio.CancelledError:
            self._record(m.CANCELLED, sc.gate.now())
            raise
        finally:
            # An unfinished response's connection is dropped, which is how the engine learns that
            # the client went away and aborts the request.
            upstream.close()

    async def _relay_error(self, upstream: Response) -> web.Response:
        try:
            payload = await upstream.read()
        except EngineError:
            payload = b""
        outcome = m.BAD_REQUEST if 400 <= upstream.status < 500 else m.ERROR
        self._record(outcome, self.sc.gate.now())
        headers = self._headers(outcome)
        if upstream.status == 503:
            headers["Retry-After"] = upstream.headers.get("retry-after", str(self.sc.settings.retry_after_s))
        return web.Response(status=upstream.status, body=payload, content_type=upstream.content_type or "application/json",
                            headers=headers)

    async def _relay_whole(self, upstream: Response) -> web.Response:
        try:
            payload = await upstream.read()
        except EngineError as exc:
            raise Fail(502, f"engine failed while answering ({exc}); retry", m.ERROR, "engine_error") from None
        end = self.sc.gate.now()
        self.tokens = completion_tokens(payload)
        self.prompt_tokens = usage_prompt_tokens(payload)
        self.completed = True
        outcome = self._final_outcome(end)
        self._record(outcome, end)
        return web.Response(status=200, body=payload, content_type=upstream.content_type or "application/json",
                            headers=self._headers(outcome))

    async def _relay_stream(self, upstream: Response) -> web.StreamResponse:
        gate = self.sc.gate
        resp = web.StreamResponse(status=200, headers=self._headers(m.DEMOTED if self.best_effort else ADMITTED))
        resp.content_type = "text/event-stream"
        resp.headers["Cache-Control"] = "no-cache"
        chunked = self.request.version >= aiohttp.HttpVersion11
        if chunked:
            resp.enable_chunked_encoding()
        try:
            await resp.prepare(self.request)
        except (ConnectionError, aiohttp.ClientConnectionError):
            # The client reset its connection before the response head could be written (its
            # transport is closing, the handler not cancelled yet): a disconnect, not a 500.
            self._record(m.CANCELLED, gate.now())
            return resp
        transport = self.request.transport
        stream = StreamRelay(self, upstream, transport if chunked else None, flow_control_of(transport))
        upstream.attach(stream)
        chat_role = 1 if self.request.path.endswith("/chat/completions") else 0
        try:
            await stream.run(resp)
        except (ConnectionError, aiohttp.ClientConnectionError):
            stream.client_gone = True
        if stream.client_gone:
            self._record(m.CANCELLED, gate.now())
            # The client went away: report what was produced, as an incomplete output.
            self.tokens = max(0, stream.events - min(chat_role, stream.events) - (1 if stream.done_marker() else 0))
            return resp
        done = stream.done_marker()
        failure = stream.failure
        if failure is None and not done:
            failure = "engine ended the stream without [DONE]"
        # Not tokens: the [DONE] marker, and a chat stream's opening role-only chunk.
        self.tokens = max(0, stream.events - (1 if done else 0) - min(chat_role, stream.events))
        usage = usage_tokens(stream.prev + stream.last)
        if usage is not None:
            self.tokens = usage
            self.prompt_tokens = usage_prompt_tokens(stream.prev + stream.last)
        end = gate.now()
        if failure is not None:
            # Not a complete output: the policy gets the count with completed=False.
            self._record(m.ERROR, end)
            error = {"error": {"message": failure + "; the response is incomplete, retry", "type": "server_error",
                               "param": None, "code": "engine_error"}}
            try:
                await resp.write(b"data: " + json.dumps(error).encode() + b"\n\n")
                await resp.write_eof()
            except (ConnectionError, aiohttp.ClientConnectionError):
                pass
            return resp
        self.completed = True
        self._record(self._final_outcome(end), end)
        try:
            await resp.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionError):
            pass
        return resp


class StreamRelay(Sink):
    """Relays one SSE stream from the engine's connection to the client's as each piece arrives.

    The first piece goes through aiohttp's response (it carries the response head); after that,
    pieces are written to the client's transport from the engine connection's own callback, with
    the chunked framing aiohttp would add, so the handler task is not woken per token.

    Flow control is by callbacks, as uvicorn's: the client connection's transport calls
    `pause_writing` once more than HIGH_WATER bytes wait for the client and `resume_writing` once
    they drain below LOW_WATER (`connections.FlowControl` passes both here), and the engine's
    connection is paused and resumed from those calls; nothing polls. Without that hook (a
    transport the sidecar's server did not accept) every piece takes the queued path through
    aiohttp's response, whose `write` waits for the drain. Tokens are counted from the SSE
    `data:` events as they pass.
    """

    HIGH_WATER = 256 * 1024  # bytes buffered for the client before the engine's connection pauses
    LOW_WATER = 64 * 1024

    def __init__(self, relay: Relay, upstream: Response, transport: asyncio.Transport | None,
                 flow: FlowControl | None = None) -> None:
        self.relay, self.upstream = relay, upstream
        # Direct writes need the transport (HTTP/1.1, chunked) and the flow-control hook.
        self.transport = transport if flow is not None else None
        self.flow = flow
        self.now = relay.sc.gate.now
        self.events = 0
        self.tail = self.prev = self.last = b""
        self.queue: list[bytes] = []
        self.queued_bytes = 0
        self.direct = False  # True: on_data writes straight to the client's transport
        self.queue_full = False  # the handler's queue is over HIGH_WATER
        self.client_blocked = False  # the client's transport is over its high-water mark
        self.reading_paused = False
        self.ended = False
        self.failure: str | None = None
        self.client_gone = False
        self._waiter: asyncio.Future[None] | None = None
        if flow is not None:
            flow.set_limits(self.HIGH_WATER, self.LOW_WATER)
            flow.listener = self
            self.client_blocked = flow.paused

    def done_marker(self) -> bool:
        return b"[DONE]" in self.prev + self.last

    def _update_reading(self) -> None:
        want_paused = self.queue_full or self.client_blocked
        if want_paused != self.reading_paused:
            self.reading_paused = want_paused
            if want_paused:
                self.upstream.pause_reading()
            else:
                self.upstream.resume_reading()

    # -- the client's flow control (called by the client transport, through FlowControl) ---------

    def client_paused(self) -> None:
        self.client_blocked = True
        self._update_reading()

    def client_resumed(self) -> None:
        self.client_blocked = False
        self._update_reading()

    # -- Sink: called from the engine connection's callbacks ------------------------------------

    def on_data(self, data: bytes) -> None:
        relay = self.relay
        if relay.first_token_at is None:
            relay.first_token_at = self.now()
            relay.sc.gate.first_token(relay.req.id)
        self.events += (self.tail + data).count(b"data:")
        self.tail = data[-4:]
        self.prev, self.last = self.last, data
        if not self.direct:
            self.queue.append(data)
            self.queued_bytes += len(data)
            if self.queued_bytes > self.HIGH_WATER and not self.queue_full:
                self.queue_full = True
                self._update_reading()
            self._wake()
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            self.client_gone = True
            self.direct = False
            self._wake()
            return
        # Written even while the client is blocked: at most one read's worth lands in the buffer
        # after the engine's connection was paused.
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def on_end(self) -> None:
        self.ended = True
        self._wake()

    def on_error(self, exc: Exception) -> None:
        self.failure = f"engine failed during the stream ({exc})"
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the handler's side ---------------------------------------------------------------------

    async def run(self, resp: web.StreamResponse) -> None:
        """Until the stream ends, fails or the client goes away."""
        try:
            while True:
                if self.queue:
                    queued, self.queue, self.queued_bytes = self.queue, [], 0
                    for data in queued:
                        await resp.write(data)  # waits while the client's transport is paused
                    if self.queue_full:
                        self.queue_full = False
                        self._update_reading()
                    continue
                if self.client_gone or self.ended or self.failure is not None:
                    return
                if self.transport is not None:
                    self.direct = True
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        finally:
            if self.flow is not None and self.flow.listener is self:
                self.flow.listener = None


def forward_headers(request: web.Request) -> dict[str, str]:
    return {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}


def completion_tokens(payload: bytes) -> int:
    try:
        usage = json.loads(payload).get("usage") or {}
        return int(usage.get("completion_tokens") or 0)
    except (ValueError, AttributeError, TypeError):
        return 0


def usage_tokens(end_bytes: bytes) -> int | None:
    """completion_tokens from the stream's usage chunk, when the client asked for one."""
    at = end_bytes.rfind(b'"usage"')
    if at < 0:
        return None
    start = end_bytes.rfind(b"data:", 0, at)
    stop = end_bytes.find(b"\n\n", at)
    if start < 0:
        return None
    try:
        usage = json.loads(end_bytes[start + 5 : stop if stop >= 0 else None]).get("usage") or {}
        tokens = usage.get("completion_tokens")
        return int(tokens) if tokens is not None else None
    except (ValueError, AttributeError, TypeError):
        return None


def usage_prompt_tokens(data: bytes) -> int | None:
    """prompt_tokens of the `usage` object in a whole response or a stream's last events, if any."""
    at = data.rfind(b'"prompt_tokens"')
    if at < 0:
        return None
    rest = data[at + len(b'"prompt_tokens"'):].lstrip(b" :")
    digits = rest[: len(rest) - len(rest.lstrip(b"0123456789"))]
    return int(digits) if digits else None

