"""The sidecar's own Prometheus metrics (`saber_*`), on a registry passed in.

Counters and histograms are updated as requests end; the gauges that describe the gate (queue
depth, running, admission limit, speed model) and the sliding-window ratios are computed when
Prometheus scrapes, so there is no update path to forget.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from saber_sidecar.policy.base import PolicyStats

# Final outcomes of a request (label `outcome` of saber_requests_total).
MET = "met"  # admitted with its SLA, finished within its deadline
MISSED = "missed"  # admitted with its SLA, finished after its deadline
DEMOTED = "demoted"  # served as best effort
REJECTED = "rejected"  # 429 by the policy (cannot meet the SLA and the class says reject)
QUEUE_FULL = "queue_full"  # 429: the gate's queue is full
ENGINE_UNAVAILABLE = "engine_unavailable"  # 503: engine down or sidecar draining
ERROR = "error"  # the engine failed or died during the response
CANCELLED = "cancelled"  # the client went away first
BAD_REQUEST = "bad_request"  # 4xx for the request itself (malformed, unknown class, too large)

OUTCOMES = (MET, MISSED, DEMOTED, REJECTED, QUEUE_FULL, ENGINE_UNAVAILABLE, ERROR, CANCELLED, BAD_REQUEST)
# Outcomes that count against SLA attainment (the client wanted an answer within the SLA and
# did not get one); cancelled and bad requests are nobody's SLA.
ATTAINMENT_OUTCOMES = frozenset({MET, MISSED, DEMOTED, REJECTED, QUEUE_FULL, ENGINE_UNAVAILABLE, ERROR})

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 20.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)


class SlidingOutcomes:
    """(time, class, met) of recent requests, kept for `window_s` seconds."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._events: deque[tuple[float, str, bool]] = deque()

    def add(self, sla_class: str, met: bool) -> None:
        self._events.append((self._clock(), sla_class, met))
        self._prune()

    def _prune(self) -> None:
        cutoff = self._clock() - self.window_s
        events = self._events
        while events and events[0][0] < cutoff:
            events.popleft()

    def counts(self) -> dict[str, tuple[int, int]]:
        """(requests, met) per class in the window."""
        self._prune()
        out: dict[str, tuple[int, int]] = {}
        for _, cls, ok in self._events:
            n, met = out.get(cls, (0, 0))
            out[cls] = (n + 1, met + ok)
        return out

    def attainment(self) -> dict[str, float]:
        return {cls: met / n for cls, (n, met) in self.counts().items()}

    def goodput(self) -> float:
        """Requests that met their SLA per second, over the window (or since the first, if younger)."""
        self._prune()
        if not self._events:
            return 0.0
        met = sum(1 for _, _, ok in self._events if ok)
        span = min(self.window_s, max(1.0, self._clock() - self._events[0][0]))
        return met / span


class _GateCollector(Collector):
    def __init__(self, stats: Callable[[], PolicyStats], outcomes: SlidingOutcomes,
                 targets: Callable[[], dict[str, float]]) -> None:
        self._stats = stats
        self._outcomes = outcomes
        self._targets = targets

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        queue = GaugeMetricFamily("saber_queue_depth", "Requests waiting in the gate, by queue.", labels=["queue"])
        queue.add_metric(["sla"], stats.queued_sla)
        queue.add_metric(["best_effort"], stats.queued_best_effort)
        yield queue
        yield GaugeMetricFamily("saber_running_requests", "Requests admitted to the engine and not yet finished.",
                                value=stats.running)
        if stats.admission_limit is not None:
            yield GaugeMetricFamily("saber_admission_limit", "Concurrency the policy admits up to now.",
                                    value=stats.admission_limit)
        if stats.predicted_speed is not None:
            yield GaugeMetricFamily("saber_predicted_speed_tokens_per_second",
                                    "Per-request generation speed the speed model predicts at the current load.",
                                    value=stats.predicted_speed)
        if stats.speed_model_r2 is not None:
            yield GaugeMetricFamily("saber_speed_model_r2", "R^2 of the speed model's latest fit.",
                                    value=stats.speed_model_r2)
        if stats.speed_model_error_ratio is not None:
            yield GaugeMetricFamily("saber_speed_model_error_ratio",
                                    "Speed model's RMSE over its window relative to the mean observed speed.",
                                    value=stats.speed_model_error_ratio)
        # The learned engine model (names agreed with the operator, which puts them in the
        # SaberService status).
        if stats.engine_speeds is not None:
            speed = GaugeMetricFamily("saber_engine_speed_tokens_per_second",
                                      "Learned per-request decode speed of the engine at a batch size.",
                                      labels=["batch"])
            for batch, value in sorted(stats.engine_speeds.items()):
                speed.add_metric([str(batch)], value)
            yield speed
        if stats.engine_prefill_seconds_per_token is not None:
            yield GaugeMetricFamily("saber_engine_prefill_seconds_per_token",
                                    "Learned engine prefill cost per prompt token.",
                                    value=stats.engine_prefill_seconds_per_token)
        if stats.engine_model_confidence is not None:
            yield GaugeMetricFamily("saber_engine_model_confidence",
                                    "Share of the engine model's estimate that comes from data (0: prior only, 1).",
                                    value=stats.engine_model_confidence)
        if stats.engine_model_observations is not None:
            yield CounterMetricFamily("saber_engine_model_observations",
                                      "Observations the engine model has learned from.",
                                      value=stats.engine_model_observations)
        ratio = GaugeMetricFamily("saber_sla_attainment_ratio",
                                  "Share of requests that met their SLA over the sliding window.", labels=["class"])
        # The population of that ratio, so pods can be combined by weight (the operator does).
        window = GaugeMetricFamily("saber_sla_window_requests",
                                   "Requests in the sliding window of saber_sla_attainment_ratio.", labels=["class"])
        for cls, (n, met) in sorted(self._outcomes.counts().items()):
            ratio.add_metric([cls], met / n)
            window.add_metric([cls], n)
        yield ratio
        yield window
        # Exported so dashboards and alerts compare attainment with each class's own target.
        target = GaugeMetricFamily("saber_sla_attainment_target_ratio",
                                   "Configured share of requests that should meet the SLA, by class.",
                                   labels=["class"])
        for cls, value in sorted(self._targets().items()):
            target.add_metric([cls], value)
        yield target
        yield GaugeMetricFamily("saber_goodput_requests_per_second",
                                "Requests per second that met their SLA over the sliding window.",
                                value=self._outcomes.goodput())


class SidecarMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        stats: Callable[[], PolicyStats],
        window_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        targets: Callable[[], dict[str, float]] = dict,
    ) -> None:
        self.registry = registry
        self.requests = Counter("saber_requests", "Requests by SLA class and final outcome.",
                                ["class", "outcome"], registry=registry)
        self.duration = Histogram("saber_request_duration_seconds",
                                  "Arrival at the sidecar to the last byte of the response.",
                                  ["class"], buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("saber_time_to_first_token_seconds",
                              "Arrival at the sidecar to the first streamed chunk from the engine.",
                              ["class"], buckets=TTFT_BUCKETS, registry=registry)
        self.reloads = Counter("saber_config_reloads", "Config file reloads by result.", ["result"],
                               registry=registry)
        for result in ("success", "failure"):
            self.reloads.labels(result=result)
        self.outcomes = SlidingOutcomes(window_s, clock)
        registry.register(_GateCollector(stats, self.outcomes, targets))

    def record(self, sla_class: str, outcome: str, duration_s: float | None = None,
               ttft_s: float | None = None) -> None:
        self.requests.labels(sla_class, outcome).inc()
        if duration_s is not None and outcome in (MET, MISSED, DEMOTED):
            self.duration.labels(sla_class).observe(duration_s)
        if ttft_s is not None:
            self.ttft.labels(sla_class).observe(ttft_s)
        if outcome in ATTAINMENT_OUTCOMES:
            self.outcomes.add(sla_class, outcome == MET)
