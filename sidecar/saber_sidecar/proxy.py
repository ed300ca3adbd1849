"""The OpenAI-compatible reverse proxy: classify, ask the gate, relay to the engine (`relay.py`).

Outcome header `x-saber-outcome`: a streamed response's headers leave before its body, so they
carry the admission decision (`admitted` or `demoted`); a non-streamed response carries the
final outcome (`met`, `missed`, `demoted`). Every error carries the error outcome. The final
outcome of every request goes to `saber_requests_total{class,outcome}`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from saber_sidecar import metrics as m
from saber_sidecar.classify import Classified, RequestError, body_info, classify
from saber_sidecar.connections import track_requests
from saber_sidecar.driver import QUEUE_FULL, Gate
from saber_sidecar.engine_metrics import EngineState
from saber_sidecar.errors import (
    LLMD_DROPPED_REASON_HEADER,
    REJECT_REASON_HEADER,
    Fail,
    error_response,
)
from saber_sidecar.metrics import SidecarMetrics
from saber_sidecar.policy.base import Admit, Request
from saber_sidecar.relay import Relay, RelayContext, forward_headers
from saber_sidecar.settings import SidecarSettings
from saber_sidecar.upstream import EnginePool

log = logging.getLogger(__name__)

MAX_JSON_DEPTH = 64  # an OpenAI request nests a few levels (messages, content parts, tool schemas)
NO_CLASS = "none"  # class label for requests refused before a class was known


@dataclass(eq=False)
class Sidecar:
    """Everything the handlers share; built by the server and stored on the app."""

    settings: SidecarSettings
    gate: Gate
    metrics: SidecarMetrics
    engine: EngineState
    make_request: Callable[..., Request]
    session: aiohttp.ClientSession | None = None  # /v1/models and the engine's model name
    pool: EnginePool | None = None  # completions
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
        self._relay_context: RelayContext | None = None

    def relay_context(self) -> RelayContext:
        """The collaborators a relay works with, built once."""
        if self._relay_context is None:
            assert self.pool is not None
            self._relay_context = RelayContext(self.gate, self.metrics, self.pool, self.settings,
                                               self.engine_model_name)
        return self._relay_context

    async def engine_model_name(self) -> str | None:
        """The model the engine serves (for alias requests), read once from its /v1/models."""
        if self.engine_model is None and self.session is not None:
            try:
                async with self.session.get(self.settings.engine_url + "/v1/models") as resp:
                    data = await resp.json(content_type=None)
                self.engine_model = data["data"][0]["id"]
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError, IndexError, TypeError):
                log.warning("could not read the engine's model name; alias requests keep their model name")
        return self.engine_model


SIDECAR = web.AppKey("saber_sidecar", Sidecar)


def create_app(sidecar: Sidecar) -> web.Application:
    # Bodies are size-checked in the handler so the 413 can be an OpenAI-shaped error.
    app = web.Application(client_max_size=sidecar.settings.max_body_bytes + 1, middlewares=[track_requests])
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
        async with sc.session.get(sc.settings.engine_url + "/v1/models", headers=forward_headers(request)) as up:
            body = await up.read()
            return web.Response(status=up.status, body=body, content_type=up.content_type)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
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
    except Fail as fail:
        sc.metrics.record(label, fail.outcome)
        headers = {"x-saber-outcome": fail.outcome}
        if label != NO_CLASS:
            headers["x-saber-class"] = label
        if fail.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(fail.retry_after)))
        # Why, for machines: saber's header and llm-d's (the body's error.code says the same).
        headers[REJECT_REASON_HEADER] = headers[LLMD_DROPPED_REASON_HEADER] = fail.code
        return error_response(fail.status, fail.message, fail.code, headers)
    finally:
        sc.inflight -= 1
        if sc.inflight == 0:
            sc.idle.set()


async def _read_request(sc: Sidecar, request: web.Request):
    limit = sc.settings.max_body_bytes
    too_large = Fail(
        413, f"request body is larger than the sidecar's limit of {limit} bytes; send a shorter prompt "
        "or raise SABER_SIDECAR_MAX_BODY_BYTES", m.BAD_REQUEST, "request_too_large")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        async with asyncio.timeout(sc.settings.body_timeout_s):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    except TimeoutError:
        raise Fail(408, f"request body not received within {sc.settings.body_timeout_s:g}s", m.BAD_REQUEST,
                   "body_timeout") from None
    except (ConnectionError, aiohttp.ClientConnectionError) as exc:  # the client went away mid-body
        raise Fail(400, f"request body could not be read ({type(exc).__name__}); resend the request",
                   m.CANCELLED, "invalid_body") from None
    except (aiohttp.ClientPayloadError, web.HTTPBadRequest) as exc:  # it broke the body's framing
        raise Fail(400, f"request body could not be read ({type(exc).__name__}); resend the request",
                   m.BAD_REQUEST, "invalid_body") from None
    if len(raw) > limit:
        raise too_large
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Fail(400, f"request body is not valid JSON ({exc}); send a JSON object", m.BAD_REQUEST,
                   "invalid_json") from None
    except RecursionError:
        raise Fail(400, "request body nests JSON too deeply; send a flatter JSON object", m.BAD_REQUEST,
                   "invalid_json") from None
    if json_depth(body) > MAX_JSON_DEPTH:
        # Whether json.loads hits its recursion limit depends on the stack depth it starts at, so a
        # body near that limit must be refused by a fixed bound, not by chance.
        raise Fail(400, f"request body nests JSON too deeply (over {MAX_JSON_DEPTH} levels); send a flatter JSON object",
                   m.BAD_REQUEST, "invalid_json")
    chat = request.path.endswith("/chat/completions")
    try:
        info = body_info(body, chat)
        classified = classify(sc.gate.config, request.headers, info.model)
    except RequestError as exc:
        raise Fail(400, str(exc), m.BAD_REQUEST, exc.code) from None
    return raw, body, info, classified


def json_depth(value: object) -> int:
    """How deeply containers nest in a parsed JSON value (iterative: no recursion to run out of)."""
    depth = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: Iterable[object] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        depth = max(depth, level)
        stack.extend((child, level + 1) for child in children)
    return depth


def _engine_down(sc: Sidecar, message: str) -> web.Response:
    return error_response(503, message, "engine_unavailable", {"Retry-After": str(sc.settings.retry_after_s)})


async def _serve(sc: Sidecar, request: web.Request, arrival: float, raw: bytes, body: dict, info,
                 classified: Classified) -> web.StreamResponse:
    settings = sc.settings
    cls = classified.sla_class
    if sc.draining:
        raise Fail(503, "sidecar is shutting down; retry (another replica will take the request)",
                   m.ENGINE_UNAVAILABLE, "shutting_down", settings.retry_after_s)
    if not sc.engine.healthy:
        raise Fail(503, f"engine is unavailable ({sc.engine.last_error}); retry later", m.ENGINE_UNAVAILABLE,
                   "engine_unavailable", settings.retry_after_s)
    max_tokens = info.max_tokens or cls.output_tokens or settings.default_max_tokens
    deadline = arrival + classified.deadline_s if classified.deadline_s is not None else None
    req = sc.make_request(sc.gate.config, cls.name, sc.next_id(), arrival, max_tokens,
                          prompt_tokens=info.prompt_tokens, deadline=deadline)
    # Per-request SLO headers (saber's, llm-d's, inference-perf's) override the class's targets.
    if classified.ttft_s is not None:
        req.ttft_deadline = arrival + classified.ttft_s
    if classified.tpot_s is not None:
        req.tpot_target = classified.tpot_s
    try:
        decision = await sc.gate.admit(req)
    except asyncio.CancelledError:
        sc.metrics.record(cls.name, m.CANCELLED)
        raise
    if not isinstance(decision, Admit):
        if decision.reason == QUEUE_FULL:
            raise Fail(429, f"the sidecar's queue is full ({sc.gate.config.scheduling.max_queue} waiting); "
                       "retry after a moment", m.QUEUE_FULL, "queue_full", decision.retry_after_s)
        raise Fail(429, f"request of SLA class {cls.name!r} cannot meet its deadline: {decision.reason}; "
                   "retry later or use a class with a longer deadline", m.REJECTED, "sla_unattainable",
                   decision.retry_after_s)
    best_effort = decision.best_effort or sc.gate.was_demoted(req.id)
    relay = Relay(sc.relay_context(), request, req, raw, body, classified, best_effort)
    try:
        return await relay.run()
    finally:
        sc.gate.finished(req.id, relay.tokens, relay.first_token_at, completed=relay.completed,
                         prompt_tokens=relay.prompt_tokens)


