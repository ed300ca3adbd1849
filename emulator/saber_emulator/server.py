"""The real-time driver: an aiohttp server speaking vLLM's HTTP API around the virtual-time engine.

One asyncio loop. A single driver task runs `engine.step(t)`, sleeps until the step's end, then
hands each waiting stream its new tokens in one batch (one future per stream per step, no task per
token). Step start times chain on the model's end times, so sleep jitter does not accumulate.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from .engine import EngineConfig, EngineCore, EngineRequest, StepResult
from .metrics import EngineMetrics
from .profile import LatencyProfile, load_profile
from .protocol import (
    DEFAULT_CHARS_PER_TOKEN,
    ChunkWriter,
    ProtocolContext,
    ProtocolError,
    TokenCounter,
    chat_body,
    completion_body,
    parse_chat,
    parse_completion,
    parse_json,
    token_text,
)

# Reported by /version: the vLLM API generation the emulator imitates.
VLLM_COMPAT_VERSION = "0.11.0"
# If the driver falls this far behind the model's clock, it restarts the chain from now instead of
# racing to catch up (the emulator was the bottleneck; the lag is visible in the step intervals).
MAX_LAG_S = 0.05
# The selector rounds timeouts to whole milliseconds; the driver sleeps until this close to a step's
# end and yields to the loop (serving streams meanwhile) for the rest, to land within ~0.1 ms.
SPIN_S = 0.0015


log = logging.getLogger(__name__)

class EmulatorSettings(BaseModel):
    """Everything `saber emulator` takes; flag names follow vLLM's where they exist."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="Address to bind.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to bind; 0 picks a free one.")
    model: str = Field(default="Qwen/Qwen2.5-Coder-3B-Instruct", min_length=1, description="Model name (as vLLM's --model).")
    served_model_name: list[str] = Field(default_factory=list, description="Names clients use; default: [model].")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    profile: str | None = Field(default=None, description="Latency profile: built-in name or JSON file; default the paper's.")
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="Seed for drawn output lengths.")
    tokenizer: str | None = Field(default=None, description="tokenizer.json (or folder) for exact prompt lengths.")
    chars_per_token: float = Field(default=DEFAULT_CHARS_PER_TOKEN, gt=0, le=100, description="Prompt estimate without a tokenizer.")

    def served_names(self) -> list[str]:
        return self.served_model_name or [self.model]


class _Stream:
    """A request waiting on the driver: pending tokens and a one-shot wakeup."""

    __slots__ = ("pending", "finish", "waiter")

    def __init__(self) -> None:
        self.pending = 0
        self.finish: str | None = None
        self.waiter: asyncio.Future | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)


class EmulatorServer:
    def __init__(self, settings: EmulatorSettings, profile: LatencyProfile | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.profile = profile or load_profile(settings.profile)
        self.engine = EngineCore(settings.engine, self.profile, settings.seed)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = EngineMetrics(self.engine, self.registry, settings.served_names()[0])
        self.ctx = ProtocolContext(
            served_model_names=settings.served_names(),
            max_model_len=settings.engine.max_model_len,
            counter=TokenCounter(settings.tokenizer, settings.chars_per_token),
        )
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._id_prefix = os.urandom(4).hex()
        self._wake = asyncio.Event()
        self._driver: asyncio.Task | None = None
        self._runner: web.AppRunner | None = None
        self._t0 = 0.0
        self.step_log: list[tuple[float, float]] | None = None  # (model duration, actual interval), when enabled
        self.port: int | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.handle_completions)
        app.router.add_post("/v1/chat/completions", self.handle_chat)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/version", self.handle_version)
        app.router.add_get("/metrics", self.handle_metrics)
        return app

    async def start(self) -> int:
        """Bind and start driving; returns the bound port."""
        loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        self._driver = asyncio.create_task(self._drive(), name="saber-emulator-driver")
        # handler_cancellation: a client that goes away cancels its handler at once, which aborts its request.
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._driver is not None:
            self._driver.cancel()
            try:
                await self._driver
            except asyncio.CancelledError:
                pass
            self._driver = None

    def clock(self) -> float:
        """The engine's clock: seconds since start, on the loop's monotonic time."""
        return asyncio.get_running_loop().time() - self._t0

    # ---- the driver ------------------------------------------------------------------------------
    async def _drive(self) -> None:
        engine = self.engine
        next_start: float | None = None
        last_delivery: float | None = None
        while True:
            if not engine.has_work:
                self._wake.clear()
                await self._wake.wait()
                next_start = None
                last_delivery = None
                continue
            now = self.clock()
            start = now if next_start is None or now - next_start > MAX_LAG_S else next_start
            out = engine.step(start)
            if out is None:  # nothing schedulable now; wait for an arrival or abort to change that
                self._wake.clear()
                ready = engine.next_ready_time()  # or for a request's fixed overhead to pass
                wait = ready - self.clock() if ready is not None else None
                try:
                    await asyncio.wait_for(self._wake.wait(), wait if wait is not None and wait > 0 else None)
                except TimeoutError:
                    pass
                next_start = None
                continue
            delay = out.end - self.clock()
            if delay > SPIN_S:
                await asyncio.sleep(delay - SPIN_S)
            # yield-spin the last stretch: the selector's timeout is 1 ms coarse. This waits on the clock, not on
            # a state change an Event could signal, hence the noqa.
            while self.clock() < out.end:  # noqa: ASYNC110
                await asyncio.sleep(0)
            delivered = self.clock()
            if self.step_log is not None and last_delivery is not None:
                self.step_log.append((out.duration, delivered - last_delivery))
            last_delivery = delivered
            next_start = out.end
            self._deliver(out)

    def _deliver(self, out: StepResult) -> None:
        streams = self._streams
        for rid in out.new_tokens:
            st = streams.get(rid)
            if st is not None:
                st.pending += 1
                st.wake()
        for f in out.finished:
            st = streams.get(f.id)
            if st is not None:
                st.finish = f.reason
                st.wake()
        self.metrics.observe_step(out)

    # ---- requests --------------------------------------------------------------------------------
    def _admit(self, parsed, prefix: str) -> tuple[str, _Stream]:
        rid = f"{prefix}-{self._id_prefix}{next(self._ids):x}"
        self.engine.add_request(EngineRequest(
            id=rid, prompt_tokens=parsed.prompt_tokens, max_tokens=parsed.max_tokens, priority=parsed.priority,
            arrival_time=self.clock(), min_tokens=parsed.min_tokens, ignore_eos=parsed.ignore_eos,
            output_tokens=parsed.stop_at_tokens,
        ))
        log.debug("request %s: prompt %d tokens, max_tokens %d, priority %d",
                  rid, parsed.prompt_tokens, parsed.max_tokens, parsed.priority)
        st = _Stream()
        self._streams[rid] = st
        self._wake.set()
        return rid, st

    def _release(self, rid: str, st: _Stream) -> None:
        self._streams.pop(rid, None)
        if st.finish is None:  # the client left (or the server is stopping): free the slot and blocks now
            self.engine.abort(rid, self.clock())
            self._wake.set()

    async def _next(self, st: _Stream) -> None:
        if st.pending == 0 and st.finish is None:
            st.waiter = asyncio.get_running_loop().create_future()
            await st.waiter

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            body = parse_json(await request.read())
            parsed = parse_completion(body, self.ctx) if kind == "completion" else parse_chat(body, self.ctx)
        except ProtocolError as exc:
            return web.json_response(exc.body(), status=exc.status)
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        try:
            rid, st = self._admit(parsed, prefix)
        except ValueError as exc:  # the engine's own limits; validation normally answers first
            return web.json_response(ProtocolError(str(exc)).body(), status=400)
        created = int(time.time())
        try:
            if parsed.stream:
                return await self._stream(request, parsed, rid, st, created)
            generated = 0
            while st.finish is None:
                await self._next(st)
                generated += st.pending
                st.pending = 0
            generated += st.pending
            text = token_text(0, generated)
            make = completion_body if kind == "completion" else chat_body
            return web.json_response(make(rid, created, parsed.model, text, st.finish, parsed.prompt_tokens, generated))
        finally:
            self._release(rid, st)

    async def _stream(self, request: web.Request, parsed, rid: str, st: _Stream, created: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        w = ChunkWriter(parsed.kind, rid, created, parsed.model)
        if parsed.kind == "chat":
            await resp.write(w.role_chunk().encode())
        try:
            while True:
                await self._next(st)
                n, st.pending = st.pending, 0
                if st.finish is None:
                    await resp.write(w.tokens(n).encode())
                    continue
                out = w.tokens(n, st.finish) if n else w.finish_chunk(st.finish)
                if parsed.include_usage:
                    out += w.usage_chunk(parsed.prompt_tokens, w.sent)
                out += w.done()
                await resp.write(out.encode())
                await resp.write_eof()
                return resp
        except ConnectionResetError:  # the client went away between wakeups; the caller aborts the request
            return resp

    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completion")

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def handle_models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        data: list[dict[str, object]] = [
            {"id": name, "object": "model", "created": created, "owned_by": "vllm", "root": self.settings.model,
             "parent": None, "max_model_len": self.settings.engine.max_model_len, "permission": []}
            for name in self.settings.served_names()]
        return web.json_response({"object": "list", "data": data})

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def handle_version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VLLM_COMPAT_VERSION, "emulator": "saber-emulator",
                                  "profile": self.profile.name})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve_forever(settings: EmulatorSettings) -> None:
    server = EmulatorServer(settings)
    port = await server.start()
    print(f"saber emulator: model {settings.served_names()[0]} (profile {server.profile.name}) "
          f"listening on http://{settings.host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


