"""Saber's Grafana dashboard, as code (plain dicts: reviewable, no dependency).

`dashboard()` is the single definition; `main()` writes `manifests/monitoring/saber-dashboard.json`,
which `manifests/monitoring/grafana/kustomization.yaml` turns into a ConfigMap labelled
`grafana_dashboard: "1"` for Grafana's sidecar provisioning. `--check` fails when the checked-in JSON
differs from what this module renders (the unit tests run the same comparison).

Every query filters on the template variables `namespace`, `service` (the SaberService name) and
`pod`, which the scrape configs in `manifests/monitoring/` attach to both containers of a pod
(`container="sidecar"` for `saber_*`, `container="engine"` for `vllm:*`).

Run: `.venv/bin/python tools/dashboards.py` (write) or `.venv/bin/python tools/dashboards.py --check`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_FILE = ROOT / "manifests" / "monitoring" / "saber-dashboard.json"
UID = "saber-overview"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'namespace=~"$namespace", service=~"$service", pod=~"$pod"'
RATE = "$__rate_interval"
# Same default as SLAClass.target_attainment, used when the sidecar exports no target series.
DEFAULT_TARGET_ATTAINMENT = 0.95
SPEED_MODEL_R2_WARN = 0.8
# Final outcomes of saber_requests_total (saber_sidecar.metrics) in which the client got no answer.
TURNED_AWAY = "rejected|queue_full|engine_unavailable"
WIDTH = 24


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def _targets(queries: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)]


def timeseries(
    title: str,
    description: str,
    queries: list[tuple[str, str]],
    unit: str,
    *,
    min_: float | None = None,
    max_: float | None = None,
    thresholds: list[tuple[str, float | None]] | None = None,
    dashed: list[str] | None = None,
    stack: bool = False,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10 if stack else 0,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "thresholdsStyle": {"mode": "dashed" if thresholds else "off"},
        },
    }
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    if thresholds:
        defaults["thresholds"] = _thresholds(thresholds)
    overrides = [
        {
            "matcher": {"id": "byRegexp", "options": pattern},
            "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}],
        }
        for pattern in dashed or []
    ]
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": overrides},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": _targets(queries),
    }


def stat(
    title: str,
    description: str,
    expr: str,
    unit: str,
    thresholds: list[tuple[str, float | None]],
) -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": _thresholds(thresholds)}, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        },
        "targets": _targets([(expr, "")]),
    }


def _thresholds(steps: list[tuple[str, float | None]]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": color, "value": value} for color, value in steps]}


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def quantiles(metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    """histogram_quantile queries of `metric` (a bucket selector, possibly an `or` of two)."""
    keys = f"le, {by}" if by else "le"
    prefix = "{{" + by + "}} " if by else ""
    return [
        (f"histogram_quantile({q}, sum by ({keys}) ({metric}))", f"{prefix}p{round(q * 100):d}")
        for q in qs
    ]


def _rate(metric: str) -> str:
    return f"rate({metric}{{{SEL}}}[{RATE}])"


def sidecar_panels() -> list[tuple[dict[str, Any], int, int]]:
    """(panel, width, height) of the sidecar's rows, in reading order."""
    attainment = f"avg by (class) (saber_sla_attainment_ratio{{{SEL}}})"
    target_expr = (
        f"avg by (class) (saber_sla_attainment_target_ratio{{{SEL}}})"
        f" or {attainment} * 0 + {DEFAULT_TARGET_ATTAINMENT}"
    )
    return [
        (row("Service level"), WIDTH, 1),
        (
            stat(
                "Lowest class attainment",
                "The worst SLA class's share of requests that met their deadline (sidecar sliding window).",
                f"min({attainment})",
                "percentunit",
                [("red", None), ("orange", 0.9), ("green", DEFAULT_TARGET_ATTAINMENT)],
            ),
            6,
            4,
        ),
        (
            stat(
                "Goodput",
                "Requests per second that finished within their SLA, summed over the selected pods.",
                f"sum(saber_goodput_requests_per_second{{{SEL}}})",
                "reqps",
                [("blue", None)],
            ),
            6,
            4,
        ),
        (
            stat(
                "Requests running",
                "Requests the sidecars have admitted into their engines, now.",
                f"sum(saber_running_requests{{{SEL}}})",
                "short",
                [("blue", None)],
            ),
            6,
            4,
        ),
        (
            stat(
                "Rejected",
                "Requests per second the sidecars turned away: 429 (cannot meet the SLA, queue full) or 503"
                " (engine unavailable).",
                f'sum(rate(saber_requests_total{{{SEL}, outcome=~"{TURNED_AWAY}"}}[{RATE}])) or vector(0)',
                "reqps",
                [("green", None), ("red", 0.01)],
            ),
            6,
            4,
        ),
        (
            timeseries(
                "SLA attainment by class, against target",
                "Share of each class's requests that met their deadline over the sidecar's sliding window"
                " (solid), and the class's target (dashed; the SLAClass default 0.95 where the sidecar"
                " exports no target series).",
                [(attainment, "{{class}}"), (target_expr, "target {{class}}")],
                "percentunit",
                min_=0,
                max_=1,
                dashed=["target .*"],
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Goodput and offered load",
                "Goodput: requests per second that met their SLA. Offered: all requests reaching the sidecars.",
                [
                    (f"sum(saber_goodput_requests_per_second{{{SEL}}})", "goodput"),
                    (f"sum({_rate('saber_requests_total')})", "offered"),
                ],
                "reqps",
                min_=0,
                dashed=["offered"],
            ),
            12,
            8,
        ),
        (row("Admission"), WIDTH, 1),
        (
            timeseries(
                "Admission outcomes",
                "How requests ended, per second, by the outcome label of saber_requests_total: met or missed"
                " (admitted with their SLA), demoted (served best effort), rejected or queue_full (429),"
                " engine_unavailable (503), error, cancelled, bad_request.",
                [(f"sum by (outcome) ({_rate('saber_requests_total')})", "{{outcome}}")],
                "reqps",
                min_=0,
                stack=True,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Queue depth",
                "Requests waiting in the sidecars' queues: sla (requests with a deadline) and best_effort (demoted).",
                [(f"sum by (queue) (saber_queue_depth{{{SEL}}})", "{{queue}}")],
                "short",
                min_=0,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Admission limit against running requests",
                "The concurrency the gate currently allows (dashed) and the requests it has running, per pod."
                " Running pinned at the limit with queues growing means the engine is the bottleneck.",
                [
                    (f"saber_admission_limit{{{SEL}}}", "limit {{pod}}"),
                    (f"saber_running_requests{{{SEL}}}", "running {{pod}}"),
                ],
                "short",
                min_=0,
                dashed=["limit .*"],
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Predicted against observed speed",
                "Per-request generation speed the speed model predicts at the current load (dashed), and what"
                " the engine delivers: generated tokens per second divided by requests running.",
                [
                    (f"saber_predicted_speed_tokens_per_second{{{SEL}}}", "predicted {{pod}}"),
                    (
                        f"sum by (pod) ({_rate('vllm:generation_tokens_total')})"
                        f" / (sum by (pod) (avg_over_time(vllm:num_requests_running{{{SEL}}}[{RATE}])) > 0)",
                        "observed {{pod}}",
                    ),
                ],
                "short",
                min_=0,
                dashed=["predicted .*"],
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Speed model R² and relative error",
                f"Goodness of fit of the online speed model (R²) and its RMSE relative to the mean observed"
                f" speed; the SaberSpeedModelPoorFit alert fires when R² is under {SPEED_MODEL_R2_WARN} and the"
                " error over 15% for 15 minutes.",
                [(f"saber_speed_model_r2{{{SEL}}}", "R² {{pod}}"),
                 (f"saber_speed_model_error_ratio{{{SEL}}}", "error {{pod}}")],
                "none",
                max_=1,
                thresholds=[("red", None), ("green", SPEED_MODEL_R2_WARN)],
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Learned engine speed by batch size",
                "Per-request decode speed the gate's engine model has learned for this engine, at batch sizes"
                " 1 to 64 (saber_engine_speed_tokens_per_second); it starts at the prior (the configured"
                " engine profile or speed curve) and follows the engine's measured step times.",
                [(f"saber_engine_speed_tokens_per_second{{{SEL}}}", "batch {{batch}} {{pod}}")],
                "short",
                min_=0,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Engine model: prefill cost, confidence, observations",
                "Learned prefill seconds per prompt token (left), the data's share of the model's estimate"
                " at the batch the gate plans at (0: prior only; under about 0.8 the gate is still in slow"
                " start), and observations learned from per second.",
                [(f"saber_engine_prefill_seconds_per_token{{{SEL}}}", "prefill s/token {{pod}}"),
                 (f"saber_engine_model_confidence{{{SEL}}}", "confidence {{pod}}"),
                 (f"rate(saber_engine_model_observations_total{{{SEL}}}[{RATE}])", "observations/s {{pod}}")],
                "none",
                min_=0,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Config reloads",
                "Sidecar config reloads over the rate interval, by result; failures mean a changed SLA config"
                " was rejected and the previous one still applies.",
                [(f"sum by (result) (increase(saber_config_reloads_total{{{SEL}}}[{RATE}]))", "{{result}}")],
                "short",
                min_=0,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "End-to-end latency by class (sidecar)",
                "Quantiles of request duration as clients see it (arrival at the sidecar to the last byte).",
                quantiles(f"rate(saber_request_duration_seconds_bucket{{{SEL}}}[{RATE}])", by="class", qs=(0.5, 0.95)),
                "s",
                min_=0,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Time to first token by class (sidecar)",
                "Quantiles of time to first token as clients see it, queueing in the sidecar included.",
                quantiles(
                    f"rate(saber_time_to_first_token_seconds_bucket{{{SEL}}}[{RATE}])", by="class", qs=(0.5, 0.95)
                ),
                "s",
                min_=0,
            ),
            12,
            8,
        ),
    ]


def engine_panels() -> list[tuple[dict[str, Any], int, int]]:
    return [
        (row("Engine (vLLM)"), WIDTH, 1),
        (
            timeseries(
                "Engine requests running and waiting",
                "vLLM's own counts: requests in the running batch and in its waiting queue, per pod.",
                [
                    (f"sum by (pod) (vllm:num_requests_running{{{SEL}}})", "running {{pod}}"),
                    (f"sum by (pod) (vllm:num_requests_waiting{{{SEL}}})", "waiting {{pod}}"),
                ],
                "short",
                min_=0,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "KV cache usage",
                "Share of the engine's KV cache blocks in use (vllm:kv_cache_usage_perc, or"
                " vllm:gpu_cache_usage_perc on older vLLM). Near 100% the engine preempts requests.",
                [
                    (
                        f"max by (pod) (vllm:kv_cache_usage_perc{{{SEL}}} or vllm:gpu_cache_usage_perc{{{SEL}}})",
                        "{{pod}}",
                    )
                ],
                "percentunit",
                min_=0,
                max_=1,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Engine time to first token",
                "Quantiles of vLLM's time to first token (engine side: no sidecar queueing).",
                quantiles(_rate("vllm:time_to_first_token_seconds_bucket")),
                "s",
                min_=0,
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Engine inter-token latency",
                "Quantiles of the time between consecutive output tokens (vllm:inter_token_latency_seconds,"
                " or vllm:time_per_output_token_seconds on older vLLM).",
                quantiles(
                    f"{_rate('vllm:inter_token_latency_seconds_bucket')}"
                    f" or {_rate('vllm:time_per_output_token_seconds_bucket')}"
                ),
                "s",
                min_=0,
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Preemptions",
                "Requests the engine preempted per second (KV cache exhausted); the gate should keep this at 0.",
                [(f"sum by (pod) ({_rate('vllm:num_preemptions_total')})", "{{pod}}")],
                "ops",
                min_=0,
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Engine token throughput",
                "Prompt tokens processed and tokens generated per second, all selected pods.",
                [
                    (f"sum({_rate('vllm:prompt_tokens_total')})", "prompt"),
                    (f"sum({_rate('vllm:generation_tokens_total')})", "generation"),
                ],
                "short",
                min_=0,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Engine end-to-end latency and queue time",
                "Quantiles of vLLM's request latency and of the time requests waited in vLLM's own queue.",
                [
                    (
                        f"histogram_quantile(0.95, sum by (le) ({_rate('vllm:e2e_request_latency_seconds_bucket')}))",
                        "e2e p95",
                    ),
                    (
                        f"histogram_quantile(0.95, sum by (le) ({_rate('vllm:request_queue_time_seconds_bucket')}))",
                        "queue p95",
                    ),
                ],
                "s",
                min_=0,
            ),
            12,
            8,
        ),
    ]


def _layout(items: list[tuple[dict[str, Any], int, int]]) -> list[dict[str, Any]]:
    """Place panels left to right, wrapping at the grid width; ids in reading order."""
    panels = []
    x = y = row_height = 0
    for panel_id, (panel, width, height) in enumerate(items, start=1):
        if x + width > WIDTH:
            x, y, row_height = 0, y + row_height, 0
        panels.append({"id": panel_id, "gridPos": {"h": height, "w": width, "x": x, "y": y}, **panel})
        x += width
        row_height = max(row_height, height)
    return panels


def _query_variable(name: str, label: str, metric_selector: str) -> dict[str, Any]:
    query = f"label_values({metric_selector}, {name})"
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-variable"},
        "definition": query,
        "refresh": 2,  # on time range change: pods come and go
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def templating() -> dict[str, Any]:
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
            },
            _query_variable("namespace", "Namespace", "saber_running_requests"),
            _query_variable("service", "SaberService", 'saber_running_requests{namespace=~"$namespace"}'),
            _query_variable(
                "pod", "Pod", 'saber_running_requests{namespace=~"$namespace", service=~"$service"}'
            ),
        ]
    }


def dashboard() -> dict[str, Any]:
    return {
        "uid": UID,
        "title": "Saber: SLA-aware serving",
        "description": "SLA attainment, admission and the speed model of saber sidecars, beside their vLLM engines.",
        "tags": ["saber", "vllm", "llm-serving"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,  # shared crosshair: compare the gate and the engine at one instant
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "schemaVersion": 39,
        "version": 1,
        "templating": templating(),
        "annotations": {"list": []},
        "links": [],
        "panels": _layout(sidecar_panels() + engine_panels()),
    }


def iter_queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL expression) of every query panel's every target."""
    for panel in board["panels"]:
        for tgt in panel.get("targets", []):
            yield panel["title"], tgt["expr"]


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the checked-in JSON is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DASHBOARD_FILE.exists() or DASHBOARD_FILE.read_text() != text:
            print(f"stale, run tools/dashboards.py: {DASHBOARD_FILE.relative_to(ROOT)}", file=sys.stderr)
            return 1
        return 0
    DASHBOARD_FILE.parent.mkdir(parents=True, exist_ok=True)
    DASHBOARD_FILE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
