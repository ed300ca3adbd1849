"""Alert rules: one source rendered twice (plain rules file and PrometheusRule) and kept in sync;
promtool accepts them and their unit tests (manifests/monitoring/tests/) pass; every alert has a
runbook, and a promtool test that shows it firing."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]

MONITORING = ROOT / "manifests" / "monitoring"
PROMTOOL_TESTS = sorted((MONITORING / "tests").glob("*.yaml"))
EXPECTED_ALERTS = {
    "SaberSLAAttainmentBelowTarget",
    "SaberEngineDown",
    "SaberSidecarDown",
    "SaberQueueGrowing",
    "SaberSpeedModelPoorFit",
    "SaberConfigReloadFailing",
}


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def test_checked_in_rule_files_are_what_the_generator_renders(alerts):
    for path, text in alerts.rendered().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run .venv/bin/python tools/alerts.py"
    assert alerts.main(["--check"]) == 0


def test_prometheusrule_and_plain_file_carry_the_same_groups(alerts):
    plain = _load(alerts.RULES_FILE)
    crd = _load(alerts.PROMETHEUS_RULE_FILE)
    assert crd["apiVersion"] == "monitoring.coreos.com/v1" and crd["kind"] == "PrometheusRule"
    assert crd["metadata"]["name"]
    assert crd["spec"]["groups"] == plain["groups"]
    assert {r["alert"] for g in plain["groups"] for r in g["rules"]} == EXPECTED_ALERTS


def test_every_alert_has_severity_summary_and_runbook(alerts):
    doc = (ROOT / "docs" / "OBSERVABILITY.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in doc.splitlines()
        if line.startswith("#")
    }
    for rule in alerts.alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"], name
        assert len(ann["runbook"]) > 40, f"{name}: runbook too thin"
        path, anchor = ann["runbook_doc"].split("#")
        assert path == "docs/OBSERVABILITY.md"
        assert anchor in anchors, f"{name}: docs/OBSERVABILITY.md has no heading for #{anchor}"
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name


def test_for_override_replaces_every_for(alerts):
    groups = alerts.rule_groups(for_override="0s")
    assert {r["for"] for g in groups for r in g["rules"]} == {"0s"}
    assert {r["for"] for g in alerts.rule_groups() for r in g["rules"]} != {"0s"}


@pytest.mark.prometheus
def test_promtool_accepts_both_renderings(alerts, promtool, tmp_path):
    extracted = tmp_path / "from-prometheusrule.yaml"
    extracted.write_text(yaml.safe_dump({"groups": _load(alerts.PROMETHEUS_RULE_FILE)["spec"]["groups"]}))
    for path in (alerts.RULES_FILE, extracted):
        out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in out.stdout


@pytest.mark.prometheus
def test_promtool_rule_unit_tests_pass(promtool):
    assert PROMTOOL_TESTS, "no promtool tests under manifests/monitoring/tests/"
    out = subprocess.run(
        [promtool, "test", "rules", *[p.name for p in PROMTOOL_TESTS]],
        capture_output=True, text=True, cwd=MONITORING / "tests", timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_is_shown_firing_by_a_promtool_test():
    fired = set()
    for path in PROMTOOL_TESTS:
        for case in _load(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    assert fired == EXPECTED_ALERTS
