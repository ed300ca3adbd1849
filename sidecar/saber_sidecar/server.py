"""Wiring of the sidecar process: settings -> config -> policy -> gate -> proxy, and `saber sidecar`.

`SidecarServer` is what `main` runs and what tests start in-process on loopback (port 0).
Shutdown (SIGTERM): stop taking requests (503, /readyz 503), let in-flight requests finish
within `drain_grace_s`, then close; whatever is still running after the grace is cut off.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the imports themselves stay lazy (in start()), as before
    from aiohttp import web

    from saber_sidecar.connections import ConnectionLimits
    from saber_sidecar.engine_metrics import EngineScraper
    from saber_sidecar.proxy import Sidecar
    from saber_sidecar.reload import ConfigWatcher

log = logging.getLogger("saber.sidecar")


class SidecarServer:
    def __init__(self, settings, config=None, registry=None, seed: int = 0) -> None:
        from prometheus_client import CollectorRegistry

        from saber_sidecar.config import ConfigError, paper_config, parse_config

        self.settings = settings
        self._config_text: str | None = None
        if config is None and settings.config_path:
            try:
                self._config_text = Path(settings.config_path).read_text()
            except OSError as exc:
                raise ConfigError(f"{settings.config_path}: cannot read: {exc.strerror or exc}") from exc
            config = parse_config(self._config_text, settings.config_path)
        self.config = config or paper_config()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.seed = seed
        self.sidecar: Sidecar | None = None
        self.scraper: EngineScraper | None = None
        self.watcher: ConfigWatcher | None = None
        self._runner: web.AppRunner | None = None
        self.limits: ConnectionLimits | None = None  # the client connections' limits and counts (connections.ConnectionLimits)
        self.port: int | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "") else self.settings.host
        return f"http://{host}:{self.port}"

    def _make_policy(self, config):
        from saber_sidecar.policy import make_policy

        return make_policy(config, seed=self.seed)

    async def start(self) -> None:
        import aiohttp
        from aiohttp import web

        from saber_sidecar import metrics as m
        from saber_sidecar.connections import ConnectionCollector, ConnectionLimits, GuardedSite
        from saber_sidecar.driver import Gate
        from saber_sidecar.engine_metrics import EngineScraper
        from saber_sidecar.metrics import SidecarMetrics
        from saber_sidecar.policy import request_for
        from saber_sidecar.proxy import NO_CLASS, Sidecar, create_app
        from saber_sidecar.reload import ConfigWatcher
        from saber_sidecar.upstream import EnginePool

        s = self.settings
        gate = Gate(self._make_policy(self.config), self.config)
        metrics = SidecarMetrics(
            self.registry, gate.stats, s.attainment_window_s,
            targets=lambda: {c.name: c.target_attainment for c in gate.config.classes},
        )
        connector = aiohttp.TCPConnector(limit=s.pool_size, limit_per_host=s.pool_size, keepalive_timeout=60)
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, connect=s.connect_timeout_s, sock_read=s.read_timeout_s),
            auto_decompress=False,
        )
        self.scraper = EngineScraper(session, s.engine_url, s.scrape_interval_s, s.scrape_timeout_s,
                                     gate.observe_engine)
        pool = EnginePool(s.engine_url, max_idle=s.pool_size, connect_timeout_s=s.connect_timeout_s,
                          read_timeout_s=s.read_timeout_s)
        self.sidecar = Sidecar(s, gate, metrics, self.scraper.state, request_for, session=session, pool=pool)
        if s.config_path:
            self.watcher = ConfigWatcher(
                s.config_path,
                apply=lambda cfg: self._apply_config(cfg),
                on_result=lambda result: metrics.reloads.labels(result=result).inc(),
                interval_s=s.reload_interval_s,
                initial_text=self._config_text,
            )
        await self.scraper.scrape_once()
        self.scraper.start()
        if self.watcher is not None:
            self.watcher.start()
        # handler_cancellation: a client that disconnects cancels its handler, which frees its
        # queue slot or closes its upstream request. keepalive_timeout: aiohttp's idle limit (an
        # hour by default); the header timeout and the connection cap are the guard's (connections.py).
        handler_kwargs = {"access_log": None, "keepalive_timeout": s.idle_timeout_s}
        self._runner = web.AppRunner(create_app(self.sidecar), handler_cancellation=True, **handler_kwargs)
        await self._runner.setup()
        self.limits = ConnectionLimits(s.header_timeout_s, s.max_connections)
        self.registry.register(ConnectionCollector(self.limits))
        site = GuardedSite(self._runner, s.host, s.port, limits=self.limits, handler_kwargs=handler_kwargs,
                           on_bad_request=lambda status: metrics.record(NO_CLASS, m.BAD_REQUEST if status < 500
                                                                        else m.ERROR))
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("saber sidecar on %s -> engine %s (policy %s, classes %s)", self.url, s.engine_url,
                 self.config.scheduling.policy, ", ".join(c.name for c in self.config.classes))

    def _apply_config(self, config) -> None:
        assert self.sidecar is not None
        rebuilt = self.sidecar.gate.set_config(config, self._make_policy)
        self.config = config
        if rebuilt:
            log.info("scheduling changed: new requests go to a new %s policy", config.scheduling.policy)

    async def drain(self, grace_s: float | None = None) -> bool:
        """Refuse new requests and wait for in-flight ones; True when all finished in time."""
        assert self.sidecar is not None
        grace = self.settings.drain_grace_s if grace_s is None else grace_s
        self.sidecar.draining = True
        log.info("draining: %d request(s) in flight, grace %.1fs", self.sidecar.inflight, grace)
        try:
            await asyncio.wait_for(self.sidecar.idle.wait(), timeout=grace)
            return True
        except TimeoutError:
            log.warning("drain grace over with %d request(s) in flight; cutting them off", self.sidecar.inflight)
            return False

    async def stop(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        if self.scraper is not None:
            await self.scraper.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.sidecar is not None:
            self.sidecar.gate.close()
            if self.sidecar.session is not None:
                await self.sidecar.session.close()
            if self.sidecar.pool is not None:
                await self.sidecar.pool.close()


async def serve(settings) -> int:
    server = SidecarServer(settings)
    await server.start()
    # Printed whatever the log level: scripts and tests read the bound port (--port 0) from it.
    print(f"saber sidecar listening on {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("signal received; shutting down")
        await server.drain()
    finally:
        await server.stop()
    return 0


def run_loop(main, event_loop: str = "auto"):
    """Run `main` on uvloop when wanted and installed, else on asyncio's loop."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                raise OSError("event_loop is uvloop but uvloop is not installed; pip install uvloop") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def add_sidecar_parser(sub) -> argparse.ArgumentParser:
    """Register `saber sidecar` on the `saber` CLI's subparsers."""
    p = sub.add_parser(
        "sidecar",
        help="SLA-aware admission proxy in front of a vLLM engine",
        description="OpenAI-compatible reverse proxy that gives every request an SLA and admits, queues, "
        "demotes or rejects it. Flags override SABER_SIDECAR_* environment variables.",
    )
    p.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port to listen on (default 8080)")
    p.add_argument("--engine-url", help="engine base URL (default http://127.0.0.1:8000)")
    p.add_argument("--config", dest="config_path", help="SLA class config YAML (hot-reloaded)")
    p.add_argument("--engine-model", help="model name the engine serves (default: read from /v1/models)")
    p.add_argument("--drain-grace", dest="drain_grace_s", type=float, help="seconds to finish in-flight on SIGTERM")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    p.set_defaults(func=run_sidecar)
    return p


def run_sidecar(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from saber_sidecar.config import ConfigError
    from saber_sidecar.settings import SidecarSettings

    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {k: getattr(args, k) for k in ("host", "port", "engine_url", "config_path", "engine_model",
                                                "drain_grace_s") if getattr(args, k, None) is not None}
    try:
        settings = SidecarSettings(**overrides)
        return run_loop(serve(settings), settings.event_loop)
    except (ValidationError, ConfigError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
