"""Saber's Prometheus alert rules: one source, two renderings.

`rule_groups()` is the single definition. `main()` writes it as
  - `manifests/monitoring/prometheus-rules.yaml`   a plain Prometheus rules file (`rule_files:`), and
  - `manifests/monitoring/prometheus-operator/prometheusrule.yaml`  a prometheus-operator `PrometheusRule`,
and `--check` fails when either checked-in file differs from what this module renders
(the unit tests run the same comparison).

Label conventions the expressions rely on (set by the ServiceMonitor/PodMonitor relabelings and by
the plain scrape config in `manifests/monitoring/`): `namespace`, `service` (the SaberService name),
`pod`, and `container` (`engine` or `sidecar`).

Run: `.venv/bin/python tools/alerts.py` (write) or `.venv/bin/python tools/alerts.py --check`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "manifests" / "monitoring"
RULES_FILE = MONITORING / "prometheus-rules.yaml"
PROMETHEUS_RULE_FILE = MONITORING / "prometheus-operator" / "prometheusrule.yaml"
# Where each alert's longer runbook lives, relative to the repository (no public URL is assumed).
RUNBOOK_DOC = "docs/OBSERVABILITY.md"

# Labels by which one SaberService is identified; alerts keep them so a page names the service.
SERVICE_KEYS = "namespace, service"
# When the sidecar does not export a per-class target, the SLAClass default (target_attainment) applies.
DEFAULT_TARGET_ATTAINMENT = 0.95
MIN_SPEED_MODEL_R2 = 0.8
MAX_SPEED_MODEL_ERROR_RATIO = 0.15
QUEUE_GROWING_MIN_DEPTH = 10

ENGINE_SELECTOR = '{container="engine"}'
SIDECAR_SELECTOR = '{container="sidecar"}'


def _alert(
    name: str,
    expr: str,
    for_: str,
    severity: str,
    summary: str,
    description: str,
    runbook: str,
) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity},
        "annotations": {
            "summary": summary,
            "description": description,
            "runbook": runbook,
            "runbook_doc": f"{RUNBOOK_DOC}#{name.lower()}",
        },
    }


def _attainment_expr() -> str:
    # Attainment of a class in a service, against its target: the target series if the sidecar
    # exports one, else the SLAClass default. Only classes that saw traffic in the window count,
    # so an idle class (whose window is empty) does not page anyone.
    attainment = f"avg by ({SERVICE_KEYS}, class) (saber_sla_attainment_ratio)"
    target = (
        f"(avg by ({SERVICE_KEYS}, class) (saber_sla_attainment_target_ratio)"
        f" or {attainment} * 0 + {DEFAULT_TARGET_ATTAINMENT})"
    )
    traffic = f"sum by ({SERVICE_KEYS}, class) (rate(saber_requests_total[10m])) > 0"
    return f"({attainment} < on({SERVICE_KEYS}, class) {target})\nand on({SERVICE_KEYS}, class)\n({traffic})"


def alert_rules() -> list[dict[str, Any]]:
    return [
        _alert(
            "SaberSLAAttainmentBelowTarget",
            _attainment_expr(),
            "10m",
            "warning",
            "SLA attainment of class {{ $labels.class }} in {{ $labels.namespace }}/{{ $labels.service }}"
            " is {{ $value | humanizePercentage }}, under its target",
            "The share of requests that met their deadline, over the sidecar's sliding window, has been"
            " under the class's target_attainment for 10 minutes.",
            "Compare offered load with goodput and the admission limit on the Saber dashboard; if the"
            " admission limit sits at the running count and queues grow, add replicas (scale the"
            " SaberService); if predicted speed is above observed speed, check the speed model (R²) and"
            " the engine (KV cache, preemptions).",
        ),
        _alert(
            "SaberEngineDown",
            f"up{ENGINE_SELECTOR} == 0",
            "2m",
            "critical",
            "Engine of {{ $labels.namespace }}/{{ $labels.pod }} cannot be scraped",
            "Prometheus has failed to scrape the engine container's /metrics for 2 minutes; the sidecar"
            " then answers 503 to new requests.",
            "kubectl -n {{ $labels.namespace }} describe pod {{ $labels.pod }} and kubectl logs -c engine:"
            " look for OOMKilled, CUDA errors or a model that failed to load; the pod restarts when its"
            " liveness probe fails.",
        ),
        _alert(
            "SaberSidecarDown",
            f"up{SIDECAR_SELECTOR} == 0",
            "2m",
            "critical",
            "Saber sidecar of {{ $labels.namespace }}/{{ $labels.pod }} cannot be scraped",
            "Prometheus has failed to scrape the sidecar's /metrics for 2 minutes; clients of this pod get"
            " no answers.",
            "kubectl -n {{ $labels.namespace }} logs {{ $labels.pod }} -c sidecar; check /readyz and that"
            " the sidecar config ConfigMap is mounted.",
        ),
        _alert(
            "SaberQueueGrowing",
            f"saber_queue_depth > {QUEUE_GROWING_MIN_DEPTH} and deriv(saber_queue_depth[5m]) > 0",
            "10m",
            "warning",
            "Queue {{ $labels.queue }} of {{ $labels.namespace }}/{{ $labels.pod }} has grown for 10 minutes",
            f"More than {QUEUE_GROWING_MIN_DEPTH} requests wait in the queue and the depth keeps rising:"
            " arrivals exceed what the engine can serve within the SLAs.",
            "Scale the SaberService out (or let its autoscaler do it); check that the admission limit is not"
            " pinned low by a poor speed model, and that the engine is not preempting (KV cache full).",
        ),
        _alert(
            "SaberSpeedModelPoorFit",
            # R² alone is no verdict: with concurrency held in a narrow band there is little variance
            # to explain, so a model within a few percent can score low. Both must be bad.
            f"saber_speed_model_r2 < {MIN_SPEED_MODEL_R2}"
            f" and saber_speed_model_error_ratio > {MAX_SPEED_MODEL_ERROR_RATIO}",
            "15m",
            "warning",
            "Speed model of {{ $labels.namespace }}/{{ $labels.pod }} fits poorly (R² {{ printf \"%.2f\" $value }})",
            f"The online speed model's R² has been under {MIN_SPEED_MODEL_R2} and its relative error over"
            f" {MAX_SPEED_MODEL_ERROR_RATIO:.0%} for 15 minutes, so admission decisions rest on poor predictions.",
            "Compare predicted and observed speed on the dashboard; a changed model, GPU or engine flags"
            " needs a new initial curve in spec.scheduling.speedModel; very mixed prompt lengths widen the window.",
        ),
        _alert(
            "SaberConfigReloadFailing",
            # increase() misses the first failure of a series that has just appeared (one sample), so
            # a failure counter that was absent 10 minutes ago and is now above zero counts as well.
            'increase(saber_config_reloads_total{result="failure"}[10m]) > 0\n'
            'or (saber_config_reloads_total{result="failure"} > 0'
            ' unless saber_config_reloads_total{result="failure"} offset 10m)',
            "1m",
            "warning",
            "Sidecar of {{ $labels.namespace }}/{{ $labels.pod }} rejected its new config",
            "A changed SLA config file failed validation; the sidecar keeps running with the previous"
            " config, so the change has not taken effect.",
            "kubectl -n {{ $labels.namespace }} logs {{ $labels.pod }} -c sidecar | grep -i config: the"
            " message names the field to fix; fix the SaberService spec (or ConfigMap) it came from.",
        ),
    ]


def rule_groups(for_override: str | None = None) -> list[dict[str, Any]]:
    """The rule groups; `for_override` replaces every `for:` (tests use it to fire rules quickly)."""
    rules = alert_rules()
    if for_override is not None:
        rules = [{**rule, "for": for_override} for rule in rules]
    return [{"name": "saber.rules", "rules": rules}]


def rules_file(for_override: str | None = None) -> dict[str, Any]:
    return {"groups": rule_groups(for_override)}


def prometheus_rule() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "saber",
            "labels": {
                "app.kubernetes.io/name": "saber",
                "app.kubernetes.io/component": "monitoring",
                # The label kube-prometheus-stack's default ruleSelector matches (release name).
                "release": "prometheus",
            },
        },
        "spec": {"groups": rule_groups()},
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    # Multi-line expressions read far better as block scalars in review.
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)

HEADER = "# Generated by tools/alerts.py; edit that file and run it, do not edit this one.\n"


def dump_yaml(data: Any) -> str:
    return HEADER + yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


def rendered() -> dict[Path, str]:
    return {RULES_FILE: dump_yaml(rules_file()), PROMETHEUS_RULE_FILE: dump_yaml(prometheus_rule())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the checked-in files are stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.relative_to(ROOT))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("stale, run tools/alerts.py: " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
