"""The OpenAI-compatible reverse proxy: classify, ask the gate, relay to the engine.

Streams are relayed chunk by chunk as they arrive (no buffering, no per-chunk JSON parsing);
output tokens are counted from the SSE events (or taken from `usage` when the client asked for
it), and the time of the first chunk is the time to first token.

Outcome header `x-saber-outcome`: a streamed response's headers leave before its body, so they
carry the admission decision (`admitted` or `demoted`); a non-streamed response carries the
final outcome (`met`, `missed`, `demoted`). Every error carries the error outcome. The final
outcome of every request goes to `saber_requests_total{class,outcome}`.
"""

from __future__ import annotations

import asyncio
import json
import itertools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from saber_sidecar import metrics as m
from saber_sidecar.classify import Classified, RequestError, body_info, classify
from saber_sidecar.driver import QUEUE_FULL, Gate
from saber_sidecar.engine_metrics import EngineState
from saber_sidecar.metrics import SidecarMetrics
from saber_sidecar.policy.base import Admit, Request
from saber_sidecar.settings import SidecarSettings

log = logging.getLogger(__name__)

ADMITTED = "admitted"  # header value for a stream whose final outcome is not known yet
FORWARDED_HEADERS = ("authorization", "x-request-id", "traceparent")
NO_CLASS = "none"  # class label for requests refused before a class was known


@dataclass(eq=False)
class Sidecar:
    """Everything the handlers share; built by the server and stored on the app."""

    settings: SidecarSettings
    gate: Gate
    metrics: SidecarMetrics
    engine: EngineState
    make_request: Callable[..., Request]
    session: aiohttp.ClientSession | None = None
    draining: bool = False
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    engine_model: str | None = None
    # Request ids: a per-process random prefix and a counter (uuid4 costs a syscall per request).
    _ids: itertools.count = field(default_factory=itertools.count)
    _id_prefix: str = field(default_factory=lambda: os.urandom(4).hex())

    def next_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    def __post_init__(self) -> None:
        self.idle.set()
        self.engine_model = self.settings.engine_model


SIDECAR = web.AppKey("saber_sidecar", Sidecar)


class _Fail(Exception):
    """Answer with an OpenAI-shaped error and record `outcome`."""

    def __init__(self, status: int, message: str, outcome: str, code: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.outcome, self.code, self.retry_after = status, message, outcome, code, retry_after


def error_response(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> web.Response:
    kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}, status=status, headers=headers
    )


def create_app(sidecar: Sidecar) -> web.Application:
    # Bodies are size-checked in the handler so the 413 can be an OpenAI-shaped error.
    app = web.Application(client_max_size=sidecar.settings.max_body_bytes + 1)
    app[SIDECAR] = sidecar
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app


# -- simple endpoints ---------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    sc = request.app[SIDECAR]
    if sc.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not sc.engine.healthy:
        return web.json_response({"status": "engine unavailable", "detail": sc.engine.last_error}, status=503)
    return web.json_response({"status": "ready"})


async def metrics_endpoint(request: web.Request) -> web.Response:
    sc = request.app[SIDECAR]
    body = generate_latest(sc.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def models(request: web.Request) -> web.StreamResponse:
    sc = request.app[SIDECAR]
    assert sc.session is not None
    try:
        async with sc.session.get(sc.settings.engine_url + "/v1/models", headers=_forward_headers(request)) as up:
            body = await up.read()
            return web.Response(status=up.status, body=body, content_type=up.content_type)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return _engine_down(sc, f"engine not reachable: {type(exc).__name__}")


# -- completions --------------------------------------------------------------------------------


async def completions(request: web.Request) -> web.StreamResponse:
    sc = request.app[SIDECAR]
    arrival = sc.gate.now()
    sc.inflight += 1
    sc.idle.clear()
    label = NO_CLASS
    try:
        raw, body, info, classified = await _read_request(sc, request)
        label = classified.sla_class.name
        return await _serve(sc, request, arrival, raw, body, info, classified)
    except _Fail as fail:
        sc.metrics.record(label, fail.outcome)
        headers = {"x-saber-outcome": fail.outcome}
        if label != NO_CLASS:
            headers["x-saber-class"] = label
        if fail.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(fail.retry_after)))
        return error_response(fail.status, fail.message, fail.code, headers)
    finally:
        sc.inflight -= 1
        if sc.inflight == 0:
            sc.idle.set()


async def _read_request(sc: Sidecar, request: web.Request):
    limit = sc.settings.max_body_bytes
    too_large = _Fail(
        413, f"request body is larger than the sidecar's limit of {limit} bytes; send a shorter prompt "
        "or raise SABER_SIDECAR_MAX_BODY_BYTES", m.BAD_REQUEST, "request_too_large")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    if len(raw) > limit:
        raise too_large
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Fail(400, f"request body is not valid JSON ({exc}); send a JSON object", m.BAD_REQUEST,
                    "invalid_json") from None
    chat = request.path.endswith("/chat/completions")
    try:
        info = body_info(body, chat)
        classified = classify(sc.gate.config, request.headers, info.model)
    except RequestError as exc:
        raise _Fail(400, str(exc), m.BAD_REQUEST, exc.code) from None
    return raw, body, info, classified


def _engine_down(sc: Sidecar, message: str) -> web.Response:
    return error_response(503, message, "engine_unavailable", {"Retry-After": str(sc.settings.retry_after_s)})


async def _serve(sc: Sidecar, request: web.Request, arrival: float, raw: bytes, body: dict, info,
                 classified: Classified) -> web.StreamResponse:
    settings = sc.settings
    cls = classified.sla_class
    if sc.draining:
        raise _Fail(503, "sidecar is shutting down; retry (another replica will take the request)",
                    m.ENGINE_UNAVAILABLE, "shutting_down", settings.retry_after_s)
    if not sc.engine.healthy:
        raise _Fail(503, f"engine is unavailable ({sc.engine.last_error}); retry later", m.ENGINE_UNAVAILABLE,
                    "engine_unavailable", settings.retry_after_s)
    max_tokens = info.max_tokens or cls.output_tokens or settings.default_max_tokens
    deadline = arrival + classified.deadline_s if classified.deadline_s is not None else None
    req = sc.make_request(sc.gate.config, cls.name, sc.next_id(), arrival, max_tokens,
                          prompt_tokens=info.prompt_tokens, deadline=deadline)
    try:
        decision = await sc.gate.admit(req)
    except asyncio.CancelledError:
        sc.metrics.record(cls.name, m.CANCELLED)
        raise
    if not isinstance(decision, Admit):
        if decision.reason == QUEUE_FULL:
            raise _Fail(429, f"the sidecar's queue is full ({sc.gate.config.scheduling.max_queue} waiting); "
                        "retry after a moment", m.QUEUE_FULL, "queue_full", decision.retry_after_s)
        raise _Fail(429, f"request of SLA class {cls.name!r} cannot meet its deadline: {decision.reason}; "
                    "retry later or use a class with a longer deadline", m.REJECTED, "sla_unattainable",
                    decision.retry_after_s)
    best_effort = decision.best_effort or sc.gate.was_demoted(req.id)
    relay = _Relay(sc, request, req, raw, body, classified, best_effort)
    try:
        return await relay.run()
    finally:
        sc.gate.finished(req.id, relay.tokens, relay.first_token_at, completed=relay.completed)


class _Relay:
    """One admitted request's trip to the engine and back."""

    def __init__(self, sc: Sidecar, request: web.Request, req: Request, raw: bytes, body: dict,
                 classified: Classified, best_effort: bool) -> None:
        self.sc, self.request, self.req, self.raw, self.body = sc, request, req, raw, body
        self.classified, self.best_effort = classified, best_effort
        self.tokens = 0
        # Only a response relayed to its natural end is a complete output; anything cut off (client
        # gone, engine error) reaches the policy with completed=False and the tokens it did produce.
        self.completed = False
        self.first_token_at: float | None = None
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
            model = await _engine_model(sc)
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
        return json.dumps(body).encode() if changed else self.raw

    async def run(self) -> web.StreamResponse:
        sc, settings = self.sc, self.sc.settings
        assert sc.session is not None
        data = await self._engine_body()
        url = settings.engine_url + self.request.path
        headers = _forward_headers(self.request)
        headers["Content-Type"] = "application/json"
        try:
            upstream = await sc.session.post(url, data=data, headers=headers)
        except asyncio.TimeoutError:
            raise _Fail(504, "engine did not answer in time", m.ERROR, "engine_timeout", settings.retry_after_s) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _Fail(503, f"engine not reachable ({type(exc).__name__}: {exc}); retry later",
                        m.ENGINE_UNAVAILABLE, "engine_unavailable", settings.retry_after_s) from None
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
            # Closing (not releasing) an unfinished response drops the connection, which is how
            # the engine learns that the client went away and aborts the request.
            upstream.close()

    async def _relay_error(self, upstream: aiohttp.ClientResponse) -> web.Response:
        try:
            payload = await upstream.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            payload = b""
        outcome = m.BAD_REQUEST if 400 <= upstream.status < 500 else m.ERROR
        self._record(outcome, self.sc.gate.now())
        headers = self._headers(outcome)
        if upstream.status == 503:
            headers["Retry-After"] = upstream.headers.get("Retry-After", str(self.sc.settings.retry_after_s))
        return web.Response(status=upstream.status, body=payload, content_type=upstream.content_type or "application/json",
                            headers=headers)

    async def _relay_whole(self, upstream: aiohttp.ClientResponse) -> web.Response:
        try:
            payload = await upstream.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise _Fail(502, f"engine failed while answering ({type(exc).__name__}); retry", m.ERROR,
                        "engine_error") from None
        end = self.sc.gate.now()
        self.tokens = _completion_tokens(payload)
        self.completed = True
        outcome = self._final_outcome(end)
        self._record(outcome, end)
        return web.Response(status=200, body=payload, content_type=upstream.content_type, headers=self._headers(outcome))

    async def _relay_stream(self, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        gate = self.sc.gate
        resp = web.StreamResponse(status=200, headers=self._headers(m.DEMOTED if self.best_effort else ADMITTED))
        resp.content_type = "text/event-stream"
        resp.headers["Cache-Control"] = "no-cache"
        await resp.prepare(self.request)
        events = 0
        tail = b""
        prev = last = b""
        failure: str | None = None
        chat_role = 1 if self.request.path.endswith("/chat/completions") else 0
        chunks = upstream.content.iter_any().__aiter__()
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                failure = f"engine failed during the stream ({type(exc).__name__}: {exc})"
                break
            if self.first_token_at is None:
                self.first_token_at = gate.now()
            events += (tail + chunk).count(b"data:")
            tail = chunk[-4:]
            prev, last = last, chunk
            try:
                await resp.write(chunk)
            except (ConnectionError, aiohttp.ClientConnectionError):
                self._record(m.CANCELLED, gate.now())
                # The client went away: report what was produced, as an incomplete output.
                self.tokens = max(0, events - min(chat_role, events) - (1 if b"[DONE]" in prev + last else 0))
                return resp
        end_bytes = prev + last
        done = b"[DONE]" in end_bytes
        if failure is None and not done:
            failure = "engine ended the stream without [DONE]"
        # Not tokens: the [DONE] marker, and a chat stream's opening role-only chunk.
        self.tokens = max(0, events - (1 if done else 0) - min(chat_role, events))
        usage = _usage_tokens(end_bytes)
        if usage is not None:
            self.tokens = usage
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


def _forward_headers(request: web.Request) -> dict[str, str]:
    return {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}


def _completion_tokens(payload: bytes) -> int:
    try:
        usage = json.loads(payload).get("usage") or {}
        return int(usage.get("completion_tokens") or 0)
    except (ValueError, AttributeError, TypeError):
        return 0


def _usage_tokens(end_bytes: bytes) -> int | None:
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


async def _engine_model(sc: Sidecar) -> str | None:
    if sc.engine_model is None and sc.session is not None:
        try:
            async with sc.session.get(sc.settings.engine_url + "/v1/models") as resp:
                data = await resp.json(content_type=None)
            sc.engine_model = data["data"][0]["id"]
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError, IndexError, TypeError):
            log.warning("could not read the engine's model name; alias requests keep their model name")
    return sc.engine_model
