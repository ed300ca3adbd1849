"""The Grafana dashboard: generated JSON in sync, datasource and template variables everywhere,
queries well-formed. (Each query is also run against a real Prometheus in
tests/integration/monitoring/test_monitoring_prometheus.py.)"""

from __future__ import annotations

import json
import re

import pytest

FILTER_VARS = ("namespace", "service", "pod")
# The panels the platform team asked for (issue 6), by a word of their titles.
REQUIRED_PANELS = (
    "SLA attainment by class",
    "Goodput",
    "Admission outcomes",
    "Queue depth",
    "Admission limit against running",
    "Predicted against observed speed",
    "Speed model R²",
    "Learned engine speed by batch size",
    "Engine model: prefill cost, confidence, observations",
    "Config reloads",
    "Engine requests running and waiting",
    "KV cache usage",
    "Engine time to first token",
    "Engine inter-token latency",
    "Preemptions",
)


@pytest.fixture(scope="module")
def board(dashboards):
    return dashboards.dashboard()


def test_checked_in_json_is_what_the_generator_renders(dashboards):
    assert dashboards.DASHBOARD_FILE.read_text() == dashboards.render(), (
        "manifests/monitoring/saber-dashboard.json is stale: run .venv/bin/python tools/dashboards.py"
    )
    assert dashboards.main(["--check"]) == 0


def test_template_variables(board):
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in FILTER_VARS:
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"]["uid"] == "${datasource}"
        assert var["includeAll"] and var["multi"] and var["allValue"] == ".*"
        assert var["query"]["query"].startswith("label_values(") and var["query"]["query"].endswith(f", {name})")
    # Each variable narrows by the ones before it, so picking a namespace limits the services offered.
    assert '$namespace' in variables["service"]["query"]["query"]
    assert '$service' in variables["pod"]["query"]["query"]


def test_every_panel_and_query_uses_the_datasource_variable(board):
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_query_filters_on_namespace_service_and_pod(dashboards, board):
    for title, expr in dashboards.iter_queries(board):
        selectors = re.findall(r"\{([^{}]*)\}", re.sub(r"\{\{[^}]*\}\}", "", expr))
        assert selectors, f"{title}: no label selector in {expr}"
        for selector in selectors:
            for var in FILTER_VARS:
                assert f'{var}=~"${var}"' in selector, f"{title}: selector {{{selector}}} lacks {var}=~\"${var}\""


def _balanced(expr: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    in_string = False
    for ch in expr:
        if ch == '"':
            in_string = not in_string
        elif in_string:
            continue
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack and not in_string


def test_queries_are_well_formed(dashboards, board):
    # The full PromQL check is Prometheus itself (integration test); here, what a typo breaks first.
    known_vars = {"$namespace", "$service", "$pod", "$__rate_interval"}
    for title, expr in dashboards.iter_queries(board):
        assert _balanced(expr), f"{title}: unbalanced brackets or quotes in {expr}"
        assert set(re.findall(r"\$\w+", expr)) <= known_vars, f"{title}: unknown variable in {expr}"
        assert "rate(" not in expr or "[$__rate_interval]" in expr, f"{title}: rate without $__rate_interval"
        # rate()/increase() only make sense on counters and histogram buckets.
        for metric in re.findall(r"\b(?:rate|increase)\(([a-z_:]+)\{", expr):
            assert metric.endswith(("_total", "_bucket")), f"{title}: rate/increase of non-counter {metric}"


def test_required_panels_present_and_laid_out(board):
    titles = [p["title"] for p in board["panels"]]
    for wanted in REQUIRED_PANELS:
        assert any(t.startswith(wanted) for t in titles), f"no panel titled {wanted!r}: {titles}"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
    # No two panels overlap on the grid.
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not (mine & cells), f"{panel['title']} overlaps another panel"
        cells |= mine


def test_json_is_plain_grafana_model(dashboards):
    data = json.loads(dashboards.DASHBOARD_FILE.read_text())
    assert data["uid"] == "saber-overview"
    assert data["schemaVersion"] >= 36
    assert "id" not in data, "a provisioned dashboard must not carry a database id"
