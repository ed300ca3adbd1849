"""vLLM's Prometheus metrics, computed from the engine model.

Names, types, labels (`model_name`, `engine`) and buckets are those of vLLM's V1 engine, so
anything that scrapes a real vLLM (the sidecar, dashboards) reads the emulator unchanged.
Gauges and counters are read from the engine at scrape time; histograms are fed per step, in bulk
(one bucket increment per distinct value), to keep per-token overhead off the hot path.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .engine import EngineCore, FinishedRequest, StepResult

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

FINISHED_REASONS = ("stop", "length", "abort")


class _Histogram:
    """Cumulative-on-read histogram that accepts a count per observation."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, buckets: Iterable[float]) -> None:
        self.bounds = [float(b) for b in buckets] + [float("inf")]
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += count
        self.total += value * count

    def observe_many(self, values: list[float]) -> None:
        if not values:
            return
        first = values[0]
        if all(v == first for v in values):  # the common case: every decode in a step waited the same
            self.observe(first, len(values))
        else:
            for v in values:
                self.observe(v)

    def family(self, name: str, doc: str, labels: list[str], values: list[str]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=labels)
        acc = 0
        buckets = []
        for bound, c in zip(self.bounds, self.counts):
            acc += c
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
        fam.add_metric(values, buckets, self.total)
        return fam


class EngineMetrics:
    """A prometheus_client collector for one emulated engine; register it in the registry you pass."""

    def __init__(self, engine: EngineCore, registry: CollectorRegistry, model_name: str, engine_index: str = "0") -> None:
        self.engine = engine
        self.labels = ["model_name", "engine"]
        self.values = [model_name, engine_index]
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.itl = _Histogram(ITL_BUCKETS)
        self.e2e = _Histogram(REQUEST_LATENCY_BUCKETS)
        self.queue = _Histogram(REQUEST_LATENCY_BUCKETS)
        self.iteration_tokens = _Histogram(ITERATION_TOKENS_BUCKETS)
        registry.register(self)

    def observe_step(self, out: StepResult) -> None:
        self.iteration_tokens.observe(out.num_scheduled_tokens)
        self.ttft.observe_many(out.ttfts)
        self.itl.observe_many(out.token_intervals)
        for f in out.finished:
            self.observe_finished(f)

    def observe_finished(self, f: FinishedRequest) -> None:
        """Latency of a request that completed (aborted ones are only counted, as vLLM does)."""
        if f.reason == "abort":
            return
        self.e2e.observe(f.finish_time - f.arrival_time)
        if f.first_scheduled_time is not None:
            self.queue.observe(f.first_scheduled_time - f.arrival_time)

    def describe(self) -> list[Metric]:
        return []  # collected lazily; avoids calling collect() at registration

    def collect(self) -> Iterator[Metric]:
        e, L, V = self.engine, self.labels, self.values
        c = e.counters

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=L)
            g.add_metric(V, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            m = CounterMetricFamily(name, doc, labels=L)
            m.add_metric(V, value)
            return m

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", e.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", e.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", e.kv_cache_usage)
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", c.preemptions)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", c.prompt_tokens)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", c.generation_tokens)
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.", labels=L + ["finished_reason"]
        )
        for reason in FINISHED_REASONS:
            success.add_metric(V + [reason], c.finished.get(reason, 0))
        yield success
        yield self.ttft.family("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", L, V)
        yield self.itl.family("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", L, V)
        yield self.e2e.family("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", L, V)
        yield self.queue.family("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", L, V)
        yield self.iteration_tokens.family("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", L, V)
