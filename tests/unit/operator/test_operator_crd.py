"""The CRD: in sync with the model, accepts the samples, rejects invalid specs; every manifest
validates against Kubernetes' own schemas; the kustomize base builds."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from saber_operator.crd import CRD_FILE, build_crd, openapi_schema, render_crd
from saber_operator.spec import parse_spec

K8S = "1.30.0"
SAMPLES = sorted(Path("manifests/samples").glob("*.yaml"))
SAMPLES = [p for p in SAMPLES if p.name != "kustomization.yaml"]


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def validator():
    schema = openapi_schema(yaml.safe_load(CRD_FILE.read_text()))
    return jsonschema.Draft4Validator(schema)


def test_checked_in_crd_matches_model():
    assert CRD_FILE.read_text() == render_crd(), "run: saber crd generate --out crds/saber.dev_saberservices.yaml"


def test_crd_shape():
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    assert crd["spec"]["group"] == "saber.dev" and version["name"] == "v1alpha1"
    assert crd["spec"]["names"]["shortNames"] == ["saber"]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert "status" in version["subresources"]
    columns = version["additionalPrinterColumns"]
    assert [c["name"] for c in columns if not c.get("priority")] == ["Ready", "Replicas", "SLA", "Policy", "Age"]
    wide = {c["name"]: c["jsonPath"] for c in columns if c.get("priority") == 1}
    assert wide == {"Model-Confidence": ".status.engineModel.confidence", "Calibration": ".status.calibration.phase"}
    spec = openapi_schema(crd)["properties"]["spec"]
    text = yaml.safe_dump(spec)
    assert "$ref" not in text and "title" not in spec
    engine = spec["properties"]["engine"]["properties"]
    assert engine["kind"]["enum"] == ["vllm", "emulator"] and engine["kind"]["default"] == "vllm"
    assert engine["gpuMemoryUtilization"]["maximum"] == 1
    assert engine["maxNumSeqs"]["description"]
    sla_class = spec["properties"]["sla"]["properties"]["classes"]["items"]["properties"]
    assert "deadlineSeconds" in sla_class and "deadline_seconds" not in sla_class
    rules = [r["rule"] for r in spec.get("x-kubernetes-validations", [])]
    assert any("model.source" in r for r in rules)


def test_crd_calibration_engine_model_and_operator_set_fields():
    schema = openapi_schema(build_crd())
    spec, status = schema["properties"]["spec"]["properties"], schema["properties"]["status"]["properties"]
    # The engine's seat limit is the operator's to set (from engine.maxNumSeqs), not the user's.
    scheduling = spec["scheduling"]["properties"]
    assert "engineMaxNumSeqs" not in scheduling and "engineProfile" in scheduling
    assert "decodeBatchSizes" in scheduling["engineProfile"]["properties"]
    cal = spec["calibration"]
    assert cal["default"] == {} and cal["properties"]["enabled"]["default"] is False
    assert set(cal["properties"]) == {
        "enabled", "image", "maxConcurrency", "durationSeconds", "extraArgs", "timeoutSeconds", "resources",
    }
    model = status["engineModel"]["properties"]
    assert model["speedTokensPerSecond"]["additionalProperties"]["type"] == "number"
    assert {"prefillSecondsPerToken", "confidence", "observations", "pods"} <= set(model)
    assert status["calibration"]["properties"]["phase"]["enum"] == ["Pending", "Running", "Succeeded", "Failed"]
    assert "configMap" in status["calibration"]["properties"] and "engineHash" in status["calibration"]["properties"]
    assert "Calibrated" in status["conditions"]["items"]["properties"]["type"]["enum"]


def test_crd_and_base_manifests_validate_against_kubernetes():
    docs = [d for p in sorted(Path("manifests/base").glob("*.yaml")) for d in load_all(p)]
    docs += [d for p in sorted(Path("crds").glob("*.yaml")) for d in load_all(p)]
    validated = 0
    for doc in docs:
        if doc.get("kind") in ("Kustomization", "ClusterKopfPeering"):
            continue  # not Kubernetes built-ins
        kubernetes_validate.validate(doc, K8S, strict=True)
        validated += 1
    assert validated == 7  # namespace, service account, role, binding, deployment, two CRDs


def test_kustomize_base_builds():
    out = subprocess.run(["kubectl", "kustomize", "manifests/base"], capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("CustomResourceDefinition") == 2
    assert {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"} <= set(kinds)
    for doc in docs:
        if doc["kind"] != "ClusterKopfPeering":
            kubernetes_validate.validate(doc, K8S, strict=True)
    op = next(d for d in docs if d["kind"] == "Deployment")
    container = op["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "--peering" in container["args"]


def test_rbac_is_least_privilege():
    role = next(d for d in load_all(Path("manifests/base/rbac.yaml")) if d["kind"] == "ClusterRole")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert not any("*" in item for item in granted)
    assert ("", "secrets", "get") not in granted and ("", "pods", "get") not in granted
    assert ("saber.dev", "saberservices/status", "patch") in granted
    assert ("apps", "deployments", "create") in granted  # server-side apply of a new object
    # Calibration Jobs (server-side apply: create and patch; get to read their status), the calibration
    # pods' termination messages (list by label), and the per-SaberService NetworkPolicy.
    for verb in ("get", "create", "patch"):
        assert ("batch", "jobs", verb) in granted
    assert ("batch", "jobs", "delete") not in granted  # owner references and the Job's TTL remove them
    assert ("", "pods", "list") in granted
    for verb in ("get", "create", "patch", "delete"):
        assert ("networking.k8s.io", "networkpolicies", verb) in granted


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_samples_accepted(path: Path, validator):
    for doc in load_all(path):
        validator.validate(doc)
        parse_spec(doc["spec"])


def _emulator_spec() -> dict:
    return copy.deepcopy(load_all(Path("manifests/samples/emulator.yaml"))[0])


INVALID = {
    "no model": lambda s: s["spec"].pop("model"),
    "no sla": lambda s: s["spec"].pop("sla"),
    "unknown engine kind": lambda s: s["spec"]["engine"].update(kind="tgi"),
    "gpu utilisation over 1": lambda s: s["spec"]["engine"].update(gpuMemoryUtilization=1.5),
    "zero max num seqs": lambda s: s["spec"]["engine"].update(maxNumSeqs=0),
    "negative replicas": lambda s: s["spec"].update(replicas=-1),
    "bad class name": lambda s: s["spec"]["sla"]["classes"][0].update(name="Not_DNS"),
    "negative deadline": lambda s: s["spec"]["sla"]["classes"][0].update(deadlineSeconds=-1),
    "unknown policy": lambda s: s["spec"].update(scheduling={"policy": "fifo"}),
    "bad service type": lambda s: s["spec"]["service"].update(type="Ingress"),
    "privileged sidecar port": lambda s: s["spec"]["sidecar"].update(port=80),
    "no classes": lambda s: s["spec"]["sla"].update(classes=[]),
    "string replicas": lambda s: s["spec"].update(replicas="two"),
    "calibration timeout too short": lambda s: s["spec"].update(calibration={"enabled": True, "timeoutSeconds": 5}),
    "calibration concurrency zero": lambda s: s["spec"].update(calibration={"maxConcurrency": 0}),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_specs_rejected_by_schema(name: str, validator):
    doc = _emulator_spec()
    INVALID[name](doc)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(doc)
    with pytest.raises(ValueError):
        parse_spec(doc["spec"])


# Cross-field rules: CEL in the CRD (checked by the API server) and the same rule in the model.
CROSS_FIELD = {
    "vllm without a model source": (lambda s: s["spec"]["engine"].update(kind="vllm"), "needs model.source"),
    "both pvc and hub": (
        lambda s: s["spec"]["model"].update(source={"pvc": {"claimName": "w"}, "hub": {"id": "a/b"}}),
        "exactly one of pvc or hub",
    ),
    "default class missing": (lambda s: s["spec"]["sla"].update(defaultClass="nope"), "default_class 'nope'"),
    "duplicate class names": (
        lambda s: s["spec"]["sla"]["classes"].append({"name": "qna", "deadlineSeconds": 3}), "duplicate SLA class"
    ),
    "sidecar on the engine port": (lambda s: s["spec"]["sidecar"].update(port=8000), "engine's port"),
    "vllm with too few GPUs": (
        lambda s: s["spec"].update(
            model={"name": "m", "source": {"hub": {"id": "a/b"}}},
            engine={"kind": "vllm", "tensorParallelSize": 4, "resources": {"limits": {"nvidia.com/gpu": 2}}},
        ),
        "tensorParallelSize 4 needs as many GPUs",
    ),
    "managed flag in extra args": (
        lambda s: s["spec"]["engine"].update(extraArgs=["--max-num-seqs=8"]), "set engine.maxNumSeqs"
    ),
}


@pytest.mark.parametrize("name", list(CROSS_FIELD))
def test_cross_field_rules_name_the_fix(name: str):
    doc = _emulator_spec()
    mutate, message = CROSS_FIELD[name]
    mutate(doc)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(doc["spec"])
