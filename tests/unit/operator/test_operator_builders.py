"""Builders: a SaberService in, child objects out; checked field by field and against
Kubernetes' own schemas (kubernetes-validate)."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from saber_emulator.profile import LatencyProfile
from saber_operator.builders import (
    DEFAULT_ENGINE_SCRAPERS,
    ENGINE_HASH_ANNOTATION,
    Owner,
    build_calibration_configmap,
    build_calibration_job,
    build_children,
    build_configmap,
    build_deployment,
    build_networkpolicy,
    build_service,
    build_servicemonitor,
    calibration_key,
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
    assert engine["image"] == "vllm/vllm-openai:v0.32.0"
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
    # The engine's seat limit reaches the gate from spec.engine, not from the user's scheduling.
    assert config.scheduling.engine_max_num_seqs == 256


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
    assert kinds == ["ConfigMap", "NetworkPolicy", "Deployment", "Service"]
    assert "NetworkPolicy" not in [c["kind"] for c in build_children(OWNER, emulator, network_policy=False)]
    sm = build_servicemonitor(OWNER, emulator)
    assert sm["spec"]["endpoints"][0] == {"port": "http", "path": "/metrics", "interval": "15s"}
    assert [c["kind"] for c in build_children(OWNER, emulator, servicemonitor=True)][-1] == "ServiceMonitor"


def test_engine_memory_limit_defaults(vllm, emulator):
    # The sample sets its own limit: kept.
    assert containers(build_deployment(OWNER, vllm))["engine"]["resources"]["limits"]["memory"] == "24Gi"
    # The emulator sample sets a limit too; without one the request becomes the limit, else a default.
    raw = sample("manifests/samples/emulator.yaml")
    raw["engine"]["resources"] = {"requests": {"memory": "700Mi"}}
    engine = containers(build_deployment(OWNER, parse_spec(raw)))["engine"]
    assert engine["resources"] == {"requests": {"memory": "700Mi"}, "limits": {"memory": "700Mi"}}
    raw["engine"]["resources"] = {}
    engine = containers(build_deployment(OWNER, parse_spec(raw)))["engine"]
    assert engine["resources"] == {"limits": {"memory": "1Gi"}}
    gpu = sample("manifests/samples/qwen-coder-vllm.yaml")
    gpu["engine"]["resources"] = {"limits": {"nvidia.com/gpu": 1}}
    engine = containers(build_deployment(OWNER, parse_spec(gpu)))["engine"]
    assert engine["resources"]["limits"] == {"nvidia.com/gpu": "1", "memory": "32Gi"}


def test_networkpolicy_opens_only_the_sidecar(emulator):
    np = build_networkpolicy(OWNER, emulator)
    kubernetes_validate.validate(np, K8S, strict=True)
    assert np["metadata"]["ownerReferences"][0]["uid"] == "1234-abcd"
    spec = np["spec"]
    # It isolates exactly the serving pods (the Service's selector), for ingress only.
    assert spec["podSelector"] == {"matchLabels": build_service(OWNER, emulator)["spec"]["selector"]}
    assert spec["policyTypes"] == ["Ingress"]
    sidecar_rule, engine_rule = spec["ingress"]
    assert sidecar_rule == {"ports": [{"protocol": "TCP", "port": 8080}]}  # from anywhere
    assert engine_rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    calib = engine_rule["from"][0]["podSelector"]["matchLabels"]
    assert calib == {"app.kubernetes.io/name": "saber-calibration", "app.kubernetes.io/instance": "coder"}
    assert engine_rule["from"][1] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    # Calibration pods carry the admitted labels, and are not selected as serving pods.
    job = build_calibration_job(OWNER, emulator, "10.0.0.7", "abc")
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert calib.items() <= pod_labels.items()
    assert not spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    # No scrapers configured: only calibration reaches the engine.
    assert build_networkpolicy(OWNER, emulator, [])["spec"]["ingress"][1]["from"] == [{"podSelector": {"matchLabels": calib}}]


def test_monitoring_scrapes_the_engine_so_the_policy_admits_scrapers():
    # manifests/monitoring scrapes the engine port directly: the default scraper peer must exist.
    podmonitor = yaml.safe_load(Path("manifests/monitoring/prometheus-operator/podmonitor.yaml").read_text())
    assert [e["port"] for e in podmonitor["spec"]["podMetricsEndpoints"]] == ["engine"]
    assert DEFAULT_ENGINE_SCRAPERS


def calibrating(**calibration):
    raw = sample("manifests/samples/emulator.yaml")
    raw["calibration"] = {"enabled": True, **calibration}
    return parse_spec(raw)


def test_calibration_job():
    spec = calibrating(maxConcurrency=32, durationSeconds=120)
    job = build_calibration_job(OWNER, spec, "10.1.2.3", "0123456789abcdef", "registry.example/saber:1")
    kubernetes_validate.validate(job, K8S, strict=True)
    key = calibration_key(spec, "0123456789abcdef")
    assert job["metadata"]["name"] == f"coder-calibrate-{key[:10]}"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "1234-abcd"
    assert job["metadata"]["annotations"] == {"saber.dev/engine-hash": "0123456789abcdef", "saber.dev/calibration-key": key}
    assert job["spec"]["backoffLimit"] == 1 and job["spec"]["activeDeadlineSeconds"] == 1800
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    # Least privilege: no API credentials at all, non-root, read-only root.
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["image"] == "registry.example/saber:1"
    assert c["command"] == ["saber", "calibrate"]
    assert c["args"] == [
        "--engine-url", "http://10.1.2.3:8000", "--model", "qwen2.5-coder-3b", "--out", "/dev/termination-log",
        "--no-plot", "--no-progress", "--max-concurrency", "32", "--duration", "120",
    ]
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["saber.dev/calibration-job"] == job["metadata"]["name"]
    assert len(job["metadata"]["name"]) <= 63
    long = Owner(name="x" * 60, namespace="n", uid="u")
    assert len(build_calibration_job(long, spec, "10.0.0.1", "h")["metadata"]["name"]) <= 63


def test_calibration_key_follows_engine_and_measurement_settings():
    spec = calibrating()
    assert calibration_key(spec, "a") == calibration_key(calibrating(), "a")
    assert calibration_key(spec, "a") != calibration_key(spec, "b")
    assert calibration_key(spec, "a") != calibration_key(calibrating(maxConcurrency=8), "a")
    # An image given for calibration wins over the sidecar's.
    job = build_calibration_job(OWNER, calibrating(image="reg/cal:2"), "10.0.0.1", "a")
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "reg/cal:2"
    assert "--max-concurrency" not in job["spec"]["template"]["spec"]["containers"][0]["args"]


PROFILE = {
    "name": "measured", "decode_batch_sizes": [1, 4, 16], "decode_step_s": [0.02, 0.025, 0.05],
    "prefill_s_per_token": 0.0014,
}


def test_calibrated_profile_overrides_pasted_one_in_the_sidecar_config():
    raw = sample("manifests/samples/emulator.yaml")
    raw["scheduling"]["engineProfile"] = {"name": "pasted", "decodeBatchSizes": [1], "decodeStepS": [0.01]}
    spec = parse_spec(raw)
    pasted = parse_config(build_configmap(OWNER, spec)["data"]["config.yaml"])
    assert pasted.scheduling.engine_profile.name == "pasted"
    calibrated = parse_config(build_configmap(OWNER, spec, PROFILE)["data"]["config.yaml"])
    assert calibrated.scheduling.engine_profile.model_dump(mode="json") == LatencyProfile(**PROFILE).model_dump(mode="json")
    # Only the ConfigMap changes: the pods are not restarted for a new profile.
    assert build_children(OWNER, spec, engine_profile=PROFILE)[2] == build_deployment(OWNER, spec)


def test_calibration_configmap():
    cm = build_calibration_configmap(OWNER, "name: x\n", "h1", "k1", "job-1", "2026-01-01T00:00:00Z")
    kubernetes_validate.validate(cm, K8S, strict=True)
    assert cm["metadata"]["name"] == "coder-calibration"
    assert cm["data"] == {"profile.yaml": "name: x\n"}
    assert cm["metadata"]["annotations"] == {
        "saber.dev/engine-hash": "h1", "saber.dev/calibration-key": "k1", "saber.dev/calibration-job": "job-1",
        "saber.dev/measured-at": "2026-01-01T00:00:00Z",
    }


def test_engine_max_num_seqs_is_the_operators():
    raw = sample("manifests/samples/emulator.yaml")
    raw["scheduling"]["engineMaxNumSeqs"] = 8
    with pytest.raises(ValueError, match="engineMaxNumSeqs must not be set: the operator sets it from spec.engine.maxNumSeqs"):
        parse_spec(raw)


def test_a_removed_saber_setting_in_a_saberservice_says_what_to_do():
    raw = sample("manifests/samples/emulator.yaml")
    raw["scheduling"]["saber"] = {"lightLoad": 0.5, "deadlineMarginSeconds": 0.05}
    with pytest.raises(ValueError, match=r"light_load \(lightLoad in a SaberService\) is no longer a setting"):
        parse_spec(raw)
    raw["scheduling"]["saber"] = {"deadlineMarginSeconds": 0.05}
    assert parse_spec(raw).sidecar_config().scheduling.saber.deadline_margin_seconds == 0.05
