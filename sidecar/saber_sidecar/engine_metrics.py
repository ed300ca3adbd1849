"""Read the engine's Prometheus `/metrics` (vLLM, or the emulator) into an `EngineSnapshot`.

vLLM has renamed metrics between releases, so every quantity is looked up through one table of
names, newest first. Series of one metric with different labels (model, engine index) are summed
for counts; the cache usage is their maximum (the fullest engine is what limits admission).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from saber_sidecar.background import BackgroundLoop
from saber_sidecar.policy.base import EngineSnapshot

log = logging.getLogger(__name__)

# quantity -> metric names, newest first.
ENGINE_METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    # Cumulative counters the gate's engine model learns step times from (optional).
    "steps": ("vllm:iteration_tokens_total_count",),
    "prompt_tokens": ("vllm:prompt_tokens_total",),
    "generation_tokens": ("vllm:generation_tokens_total",),
}


class EngineMetricsError(ValueError):
    """The text is not Prometheus exposition format or lacks the engine's metrics."""


_WANTED = tuple(sorted({n for names in ENGINE_METRIC_NAMES.values() for n in names}))


def _relevant_lines(text: str) -> str:
    """Only the lines of the metrics we read: the parser is pure Python and an engine's histograms
    make up most of its output (parsing all of it cost more CPU than the proxying it informs)."""
    keep = []
    for line in text.splitlines():
        name = line.split(" ", 3)[2] if line.startswith("# ") and line.count(" ") >= 2 else line
        if name.startswith(_WANTED):
            keep.append(line)
    return "\n".join(keep) + "\n"


def _samples_by_name(text: str) -> dict[str, list[float]]:
    wanted = set(_WANTED)
    found: dict[str, list[float]] = {}
    try:
        for family in text_string_to_metric_families(_relevant_lines(text)):
            for sample in family.samples:
                if sample.name in wanted:
                    found.setdefault(sample.name, []).append(float(sample.value))
    except ValueError as exc:
        raise EngineMetricsError(f"not Prometheus text format: {exc}") from exc
    return found


def parse_engine_metrics(text: str) -> EngineSnapshot:
    """Parse exposition text into a snapshot; raises EngineMetricsError when running/waiting are absent."""
    found = _samples_by_name(text)
    values: dict[str, float] = {}
    for quantity, names in ENGINE_METRIC_NAMES.items():
        name = next((n for n in names if n in found), None)
        if name is None:
            continue
        series = found[name]
        values[quantity] = max(series) if quantity == "kv_cache_usage" else sum(series)
    missing = [q for q in ("running", "waiting") if q not in values]
    if missing:
        raise EngineMetricsError(
            "engine /metrics lacks " + ", ".join(f"{q} ({' or '.join(ENGINE_METRIC_NAMES[q])})" for q in missing)
        )
    kv = values.get("kv_cache_usage", 0.0)
    # Some releases report a percentage, most a fraction; the policy wants a fraction.
    if kv > 1.0:
        kv /= 100.0
    return EngineSnapshot(
        running=int(values["running"]), waiting=int(values["waiting"]), kv_cache_usage=kv, healthy=True,
        steps=values.get("steps"), prompt_tokens=values.get("prompt_tokens"),
        generation_tokens=values.get("generation_tokens"),
    )


@dataclass(slots=True)
class EngineState:
    """What the proxy knows of the engine's health, from the latest scrape."""

    healthy: bool = False
    last_ok: float | None = None
    last_error: str | None = "not scraped yet"
    snapshot: EngineSnapshot | None = None
    scrapes: int = 0
    failures: int = 0


class EngineScraper(BackgroundLoop):
    task_name = "saber-engine-scraper"

    """Scrapes `<engine>/metrics` every `interval_s`, updates `state` and calls `on_snapshot`.

    A failed scrape (refused, timeout, HTTP error, unparsable) marks the engine unhealthy and
    reports `EngineSnapshot(healthy=False)` carrying the last known counts.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        engine_url: str,
        interval_s: float,
        timeout_s: float,
        on_snapshot: Callable[[EngineSnapshot], None],
        state: EngineState | None = None,
    ) -> None:
        self._session = session
        self._url = engine_url.rstrip("/") + "/metrics"
        self._interval = interval_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._on_snapshot = on_snapshot
        self.state = state or EngineState()

    async def scrape_once(self) -> EngineSnapshot:
        state = self.state
        state.scrapes += 1
        try:
            async with self._session.get(self._url, timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise EngineMetricsError(f"HTTP {resp.status} from {self._url}")
                text = await resp.text()
            snap = parse_engine_metrics(text)
        except (TimeoutError, aiohttp.ClientError, EngineMetricsError, OSError) as exc:
            state.failures += 1
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if state.healthy or state.last_error != message:
                log.warning("engine scrape failed (%s); engine marked unavailable", message)
            state.healthy = False
            state.last_error = message
            prev = state.snapshot
            snap = EngineSnapshot(
                running=prev.running if prev else 0,
                waiting=prev.waiting if prev else 0,
                kv_cache_usage=prev.kv_cache_usage if prev else 0.0,
                healthy=False,
            )
        else:
            if not state.healthy:
                log.info("engine reachable at %s", self._url)
            state.healthy = True
            state.last_ok = time.monotonic()
            state.last_error = None
            state.snapshot = snap
        self._on_snapshot(snap)
        return snap

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.scrape_once()
            except Exception:  # a bug in a callback must not stop health tracking
                log.exception("engine scrape callback failed")
            await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))
