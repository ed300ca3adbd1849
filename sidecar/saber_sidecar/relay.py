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
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from saber_sidecar import metrics as m
from saber_sidecar.classify import Classified
from saber_sidecar.policy.base import Request

if TYPE_CHECKING:
    from saber_sidecar.proxy import Sidecar

log = logging.getLogger(__name__)

ADMITTED = "admitted"  # header value for a stream whose final outcome is not known yet
FORWARDED_HEADERS = ("authorization", "x-request-id", "traceparent")


class Fail(Exception):
    """Answer with an OpenAI-shaped error and record `outcome`."""

    def __init__(self, status: int, message: str, outcome: str, code: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.outcome, self.code, self.retry_after = status, message, outcome, code, retry_after


class Relay:
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
            model = await engine_model(sc)
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
        headers = forward_headers(self.request)
        headers["Content-Type"] = "application/json"
        try:
            upstream = await sc.session.post(url, data=data, headers=headers)
        except asyncio.TimeoutError:
            raise Fail(504, "engine did not answer in time", m.ERROR, "engine_timeout", settings.retry_after_s) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise Fail(503, f"engine not reachable ({type(exc).__name__}: {exc}); retry later",
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
            raise Fail(502, f"engine failed while answering ({type(exc).__name__}); retry", m.ERROR,
                        "engine_error") from None
        end = self.sc.gate.now()
        self.tokens = completion_tokens(payload)
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
        usage = usage_tokens(end_bytes)
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


async def engine_model(sc: Sidecar) -> str | None:
    if sc.engine_model is None and sc.session is not None:
        try:
            async with sc.session.get(sc.settings.engine_url + "/v1/models") as resp:
                data = await resp.json(content_type=None)
            sc.engine_model = data["data"][0]["id"]
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError, IndexError, TypeError):
            log.warning("could not read the engine's model name; alias requests keep their model name")
    return sc.engine_model
