"""Builders: a SaberService in, child objects out; checked field by field and against
Kubernetes' own schemas (kubernetes-validate)."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
import yaml

from saber_operator.builders import (
    ENGINE_HASH_ANNOTATION,
    Owner,
    build_children,
    build_configmap,
    build_deployment,
    build_service,
    build_servicemonitor,
    render_sidecar_config,
)
from saber_operator.spec import parse_spec
from saber_sidecar.config import parse_config

OWNER = Owner(name="coder", namespace="team-a", uid="1234-abcd")
K8S = "1.30.0"


def sample(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)["spec"]


@pytest.fixture
def vllm():
    return parse_spec(sample("manifests/samples/qwen-coder-vllm.yaml"))


@pytest.fixture
def emulator():
    return parse_spec(sample("manifests/samples/emulator.yaml"))


def containers(dep):
    return {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}


def test_every_child_has_owner_reference_and_labels(vllm):
    for child in build_children(OWNER, vllm, servicemonitor=True):
        ref = child["metadata"]["ownerReferences"][0]
        assert ref == {
            "apiVersion": "saber.dev/v1alpha1", "kind": "SaberService", "name": "coder",
            "uid": "1234-abcd", "controller": True, "blockOwnerDeletion": True,
        }
        assert child["metadata"]["namespace"] == "team-a"
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "saber-operator"


def test_children_validate_against_kubernetes_schemas(vllm, emulator):
    for spec in (vllm, emulator):
        for child in build_children(OWNER, spec):
            kubernetes_validate.validate(child, K8S, strict=True)


def test_vllm_deployment(vllm):
    dep = build_deployment(OWNER, vllm, "registry.example/saber:1")
    engine, sidecar = containers(dep)["engine"], containers(dep)["sidecar"]
    assert engine["image"] == "vllm/vllm-openai:v0.10.0"
    args = engine["args"]
    flag = lambda name: args[args.index(name) + 1]  # noqa: E731
    assert flag("--model") == "Qwen/Qwen2.5-Coder-3B-Instruct"
    assert flag("--served-model-name") == "qwen2.5-coder-3b"
    assert flag("--max-model-len") == "2048"
    assert flag("--gpu-memory-utilization") == "0.8"
    assert flag("--max-num-seqs") == "256"
    assert flag("--tensor-parallel-size") == "1"
    assert flag("--port") == "8000"
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert engine["resources"]["requests"]["nvidia.com/gpu"] == "1"
    token = next(e for e in engine["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert engine["startupProbe"]["httpGet"]["path"] == "/health"
    assert sidecar["image"] == "registry.example/saber:1"
    assert sidecar["command"] == ["saber", "sidecar"]
    assert sidecar["args"] == ["--port", "8080", "--engine-url", "http://127.0.0.1:8000", "--config", "/etc/saber/config.yaml",
                               "--drain-grace", "30"]
    # The engine outlives the sidecar's drain on pod deletion, and the pod's grace covers both.
    assert engine["lifecycle"]["preStop"]["exec"]["command"] == ["sh", "-c", "sleep 30"]
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pod = dep["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_pod_security(vllm, emulator):
    for spec in (vllm, emulator):
        pod = build_deployment(OWNER, spec)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["capabilities"] == {"drop": ["ALL"]} and sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
        # Writable paths are emptyDirs; the config is a whole-directory ConfigMap mount (no subPath).
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes["cache"] and "emptyDir" in volumes["tmp"]
        mounts = [m for c in pod["containers"] for m in c["volumeMounts"]]
        config_mount = next(m for m in mounts if m["name"] == "config")
        assert config_mount["mountPath"] == "/etc/saber" and "subPath" not in config_mount


def test_pvc_source_mounts_read_only():
    spec = parse_spec({
        "model": {"name": "m", "source": {"pvc": {"claimName": "weights", "path": "qwen/3b"}}},
        "engine": {"resources": {"limits": {"nvidia.com/gpu": 1}}},
        "sla": {"classes": [{"name": "a", "deadlineSeconds": 1}], "defaultClass": "a"},
    })
    dep = build_deployment(OWNER, spec)
    engine = containers(dep)["engine"]
    assert engine["args"][engine["args"].index("--model") + 1] == "/models/qwen/3b"
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in engine["volumeMounts"]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}


def test_emulator_deployment(emulator):
    dep = build_deployment(OWNER, emulator, "registry.example/saber:1")
    engine = containers(dep)["engine"]
    assert engine["image"] == "registry.example/saber:1"
    assert engine["command"] == ["saber", "emulator"]
    assert engine["args"] == [
        "--host", "0.0.0.0", "--port", "8000", "--served-model-name", "qwen2.5-coder-3b",
        "--max-num-seqs", "256", "--max-model-len", "2048",
    ]
    assert "nvidia.com/gpu" not in str(engine.get("resources"))
    assert "shm" not in {v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]}


def test_configmap_is_the_sidecar_config(emulator):
    cm = build_configmap(OWNER, emulator)
    assert cm["metadata"]["name"] == "coder-sidecar"
    config = parse_config(cm["data"]["config.yaml"])
    assert config == emulator.sidecar_config()
    assert config.get_class("generation").target_attainment == 0.9


def test_sla_change_keeps_pod_template_engine_change_rolls(emulator):
    raw = sample("manifests/samples/emulator.yaml")
    before = build_deployment(OWNER, emulator)

    sla_changed = copy.deepcopy(raw)
    sla_changed["sla"]["classes"][0]["deadlineSeconds"] = 2.0
    sla_changed["scheduling"] = {"policy": "static", "staticMaxConcurrency": 4}
    spec = parse_spec(sla_changed)
    assert build_deployment(OWNER, spec) == before
    assert render_sidecar_config(spec) != render_sidecar_config(emulator)

    engine_changed = copy.deepcopy(raw)
    engine_changed["engine"]["maxNumSeqs"] = 64
    after = build_deployment(OWNER, parse_spec(engine_changed))
    hash_of = lambda d: d["spec"]["template"]["metadata"]["annotations"][ENGINE_HASH_ANNOTATION]  # noqa: E731
    assert hash_of(after) != hash_of(before)


def test_service_targets_sidecar(emulator):
    svc = build_service(OWNER, emulator)
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == {"app.kubernetes.io/name": "saber", "app.kubernetes.io/instance": "coder"}
    sidecar_port = containers(build_deployment(OWNER, emulator))["sidecar"]["ports"][0]
    assert sidecar_port == {"name": "http", "containerPort": 8080, "protocol": "TCP"}


def test_servicemonitor_only_when_asked(emulator):
    kinds = [c["kind"] for c in build_children(OWNER, emulator)]
    assert kinds == ["ConfigMap", "Deployment", "Service"]
    sm = build_servicemonitor(OWNER, emulator)
    assert sm["spec"]["endpoints"][0] == {"port": "http", "path": "/metrics", "interval": "15s"}
    assert [c["kind"] for c in build_children(OWNER, emulator, servicemonitor=True)][-1] == "ServiceMonitor"
