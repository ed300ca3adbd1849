"""Monitoring and GitOps manifests: each kustomization builds with `kubectl kustomize`; core objects
validate against Kubernetes' schemas (kubernetes-validate), SaberServices against the CRD's
openAPIV3Schema (jsonschema), and the prometheus-operator and Argo CD objects (CRDs with no schema
here) have the fields those controllers require; the monitors select the pods and ports the
operator actually builds."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from saber_operator.builders import Owner, build_deployment, build_service
from saber_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[3]
MANIFESTS = ROOT / "manifests"
MONITORING = MANIFESTS / "monitoring"
K8S_VERSION = "1.32.0"
KUSTOMIZATIONS = [
    "monitoring",
    "monitoring/prometheus-operator",
    "monitoring/prometheus-operator/cluster-servicemonitor",
    "overlays/emulator",
    "overlays/gpu",
    "overlays/gpu-autoscaled",
    ".",
]
# Custom resources whose CRDs are not in this repository: checked for the fields their controllers need.
FOREIGN_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "Application"}


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl not found: the manifests are built with `kubectl kustomize`")
    return path


_built: dict[str, list[dict[str, Any]]] = {}


def build(kubectl: str, rel: str) -> list[dict[str, Any]]:
    if rel not in _built:
        out = subprocess.run([kubectl, "kustomize", str(MANIFESTS / rel)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"kubectl kustomize manifests/{rel} failed:\n{out.stderr}"
        _built[rel] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return _built[rel]


def _storage_schema(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="session")
def crd_schemas() -> dict[str, dict[str, Any]]:
    """openAPIV3Schema of every CRD in crds/, by kind."""
    schemas = {}
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc.get("kind") == "CustomResourceDefinition":
            schemas[doc["spec"]["names"]["kind"]] = _storage_schema(doc)
    assert "SaberService" in schemas
    return schemas


def _require(obj: dict[str, Any], *paths: str) -> None:
    for path in paths:
        node: Any = obj
        for key in path.split("."):
            assert isinstance(node, dict) and key in node, f"{obj['kind']}/{obj['metadata']['name']}: missing {path}"
            node = node[key]
        assert node not in (None, "", [], {}), f"{obj['kind']}/{obj['metadata']['name']}: empty {path}"


def check_custom_resource(obj: dict[str, Any], crd_schemas: dict[str, dict[str, Any]]) -> None:
    kind = obj["kind"]
    if kind in crd_schemas:
        # CRD schemas are OpenAPI v3.0 (boolean exclusiveMinimum): Draft 4 reads them as the API server does.
        jsonschema.Draft4Validator(crd_schemas[kind]).validate(obj)
        if kind == "SaberService":
            parse_spec(obj["spec"])  # and the operator accepts it
    elif kind == "ServiceMonitor":
        _require(obj, "spec.selector.matchLabels", "spec.endpoints")
        for ep in obj["spec"]["endpoints"]:
            assert ep.get("port"), "ServiceMonitor endpoints need a port name"
    elif kind == "PodMonitor":
        _require(obj, "spec.selector.matchLabels", "spec.podMetricsEndpoints")
        for ep in obj["spec"]["podMetricsEndpoints"]:
            assert ep.get("port"), "PodMonitor endpoints need a port name"
    elif kind == "PrometheusRule":
        _require(obj, "spec.groups")
        for group in obj["spec"]["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert rule.get("alert") and rule.get("expr")
    elif kind == "Application":
        _require(obj, "spec.project", "spec.source.repoURL", "spec.source.path", "spec.destination.server")
    else:
        raise AssertionError(f"{kind}: a custom resource with no CRD in crds/ and no shape check here")


@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_kustomization_builds_and_validates(kubectl, crd_schemas, rel):
    objects = build(kubectl, rel)
    assert objects
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj
        if obj["kind"] in crd_schemas or obj["kind"] in FOREIGN_KINDS:
            check_custom_resource(obj, crd_schemas)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_overlays_carry_the_expected_objects(kubectl):
    def kinds(rel):
        return {(o["kind"], o["metadata"]["name"]) for o in build(kubectl, rel)}

    for rel in ("overlays/emulator", "overlays/gpu"):
        found = kinds(rel)
        assert ("SaberService", "coder") in found
        assert ("CustomResourceDefinition", "saberservices.saber.dev") in found, "overlay lacks the base"
        assert ("ConfigMap", "saber-grafana-dashboard") in found
    assert ("PodMonitor", "saber-engines") in kinds("overlays/gpu")
    assert not any(k in {"PodMonitor", "PrometheusRule"} for k, _ in kinds("overlays/emulator")), (
        "the emulator overlay must apply on clusters without prometheus-operator"
    )
    emulator = next(o for o in build(kubectl, "overlays/emulator") if o["kind"] == "SaberService")
    assert emulator["spec"]["engine"]["kind"] == "emulator"
    assert "nvidia.com/gpu" not in json.dumps(emulator)
    gpu = next(o for o in build(kubectl, "overlays/gpu") if o["kind"] == "SaberService")
    assert gpu["spec"]["engine"]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_autoscaled_overlay_leaves_replicas_to_the_hpa(kubectl):
    objects = build(kubectl, "overlays/gpu-autoscaled")
    svc = next(o for o in objects if o["kind"] == "SaberService")
    assert "replicas" not in svc["spec"], "Git must not own spec.replicas when an autoscaler does"
    hpa = next(o for o in objects if o["kind"] == "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("saber.dev/v1alpha1", "SaberService", "coder")
    assert hpa["metadata"]["namespace"] == svc["metadata"]["namespace"]
    crd = next(o for o in objects if o["metadata"]["name"] == "saberservices.saber.dev")
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"


def test_dashboard_configmap_is_the_generated_json(kubectl):
    cm = next(o for o in build(kubectl, "monitoring") if o["metadata"]["name"] == "saber-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["saber-dashboard.json"] == (MONITORING / "saber-dashboard.json").read_text()
    rules = next(o for o in build(kubectl, "monitoring") if o["metadata"]["name"] == "saber-prometheus-rules")
    assert rules["data"]["prometheus-rules.yaml"] == (MONITORING / "prometheus-rules.yaml").read_text()


def test_monitors_select_the_pods_and_ports_the_operator_builds(kubectl):
    sample = yaml.safe_load((MANIFESTS / "overlays" / "gpu" / "saberservice.yaml").read_text())
    spec = parse_spec(sample["spec"])
    owner = Owner(name=sample["metadata"]["name"], namespace=sample["metadata"]["namespace"], uid="uid-1")
    deployment = build_deployment(owner, spec)
    service = build_service(owner, spec)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: c["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]}

    monitors = build(kubectl, "monitoring/prometheus-operator") + build(
        kubectl, "monitoring/prometheus-operator/cluster-servicemonitor"
    )
    podmonitor = next(o for o in monitors if o["kind"] == "PodMonitor")
    assert podmonitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert [ports[ep["port"]] for ep in podmonitor["spec"]["podMetricsEndpoints"]] == ["engine"]
    servicemonitor = next(o for o in monitors if o["kind"] == "ServiceMonitor")
    assert servicemonitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for ep in servicemonitor["spec"]["endpoints"]:
        assert ep["port"] in service_ports and ports[ep["port"]] == "sidecar"
    # The dashboard's "service" is the SaberService name: both monitors set it from the pod label.
    for relabelings in (podmonitor["spec"]["podMetricsEndpoints"][0]["relabelings"],
                        servicemonitor["spec"]["endpoints"][0]["relabelings"]):
        assert {"sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
                "targetLabel": "service"} in relabelings
    assert pod_labels["app.kubernetes.io/instance"] == owner.name

    # The plain config keeps the same pods (by the same labels) and ports.
    plain = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    keep = plain["scrape_configs"][0]["relabel_configs"]
    label_keep = next(r for r in keep if "__meta_kubernetes_pod_label_app_kubernetes_io_name" in r["source_labels"])
    assert label_keep["regex"] == "{};{}".format(pod_labels["app.kubernetes.io/name"],
                                                 pod_labels["app.kubernetes.io/component"])
    port_keep = next(r for r in keep if r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"])
    assert set(port_keep["regex"].split("|")) == set(ports)


def test_argocd_applications_point_at_overlays():
    for path in sorted((MANIFESTS / "argocd").glob("application-*.yaml")):
        app = yaml.safe_load(path.read_text())
        check_custom_resource(app, {})
        assert app["apiVersion"] == "argoproj.io/v1alpha1"
        assert (ROOT / app["spec"]["source"]["path"] / "kustomization.yaml").exists(), path.name
        assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    autoscaled = yaml.safe_load((MANIFESTS / "argocd" / "application-gpu-autoscaled.yaml").read_text())
    assert autoscaled["spec"]["ignoreDifferences"] == [
        {"group": "saber.dev", "kind": "SaberService", "jsonPointers": ["/spec/replicas"]}
    ]
    assert "RespectIgnoreDifferences=true" in autoscaled["spec"]["syncPolicy"]["syncOptions"]


@pytest.mark.prometheus
def test_plain_prometheus_config_passes_promtool(promtool, tmp_path):
    # Debian's Prometheus is built without Kubernetes discovery: check everything else in the file.
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        job["static_configs"] = [{"targets": ["127.0.0.1:8080"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(MONITORING / "prometheus-rules.yaml", tmp_path / "prometheus-rules.yaml")
    out = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout
