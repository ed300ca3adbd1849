"""The SaberService resource: spec and status as pydantic models.

The CRD's openAPIV3Schema is generated from these models (`saber_operator.crd`), so a field's
bounds, default and description live here once. The `sla` and `scheduling` sections are the
sidecar's own config model (`saber_sidecar.config`), exposed with Kubernetes' camelCase keys:
the schema is derived from that model and the operator renders them back into it, so the
sidecar and the resource can never disagree about what a field means.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel, to_snake

from saber_sidecar.config import SchedulingConfig, SidecarConfig

GROUP = "saber.dev"
VERSION = "v1alpha1"
KIND = "SaberService"
PLURAL = "saberservices"
SINGULAR = "saberservice"
SHORT_NAMES = ["saber"]

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
ENGINE_PORT = 8000  # the engine listens here inside the pod; the sidecar forwards to it
GPU_RESOURCE = "nvidia.com/gpu"


# --- camelCase views of the sidecar's snake_case model -------------------------------------------

def camel_keys(data: Any) -> Any:
    """snake_case keys (sidecar config) -> camelCase keys (Kubernetes resource)."""
    if isinstance(data, dict):
        return {to_camel(k): camel_keys(v) for k, v in data.items()}
    if isinstance(data, list):
        return [camel_keys(v) for v in data]
    return data


def snake_keys(data: Any) -> Any:
    """camelCase keys (Kubernetes resource) -> snake_case keys (sidecar config)."""
    if isinstance(data, dict):
        return {to_snake(k): snake_keys(v) for k, v in data.items()}
    if isinstance(data, list):
        return [snake_keys(v) for v in data]
    return data


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                target = walk(copy.deepcopy(defs[node["$ref"].split("/")[-1]]))
                rest = {k: walk(v) for k, v in node.items() if k != "$ref"}
                return {**target, **rest}
            return {k: walk(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    inlined: dict[str, Any] = walk(schema)  # walk maps a dict to a dict
    return inlined


def _camel_schema(node: Any) -> Any:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "properties":
                out[key] = {to_camel(name): _camel_schema(sub) for name, sub in value.items()}
            elif key == "required":
                out[key] = [to_camel(name) for name in value]
            else:
                out[key] = _camel_schema(value)
        return out
    if isinstance(node, list):
        return [_camel_schema(v) for v in node]
    return node


def sla_json_schema() -> dict[str, Any]:
    """The schema of `spec.sla`: the sidecar config without its scheduling section."""
    schema: dict[str, Any] = _camel_schema(_inline_refs(SidecarConfig.model_json_schema()))
    schema["properties"].pop("scheduling", None)
    schema["description"] = "SLA classes the sidecar enforces (the sidecar's config model, camelCase keys)."
    return schema


# Sidecar scheduling fields the operator sets itself; a user setting them gets a clear error.
OPERATOR_SET_SCHEDULING = {"engineMaxNumSeqs": "the operator sets it from spec.engine.maxNumSeqs"}


def scheduling_json_schema() -> dict[str, Any]:
    schema: dict[str, Any] = _camel_schema(_inline_refs(SchedulingConfig.model_json_schema()))
    for name in OPERATOR_SET_SCHEDULING:
        schema["properties"].pop(name, None)
    schema["description"] = "Admission policy and its parameters (the sidecar's scheduling model, camelCase keys)."
    return schema


def _format_errors(exc: ValidationError, prefix: str) -> str:
    return "; ".join(
        f"{prefix}{'.'.join(to_camel(str(p)) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
    )


# --- spec ------------------------------------------------------------------------------------------

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


Quantity = Annotated[
    int | str,
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}),
]


class SecretKeyRef(_Model):
    """A key in a Secret in the SaberService's namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="Secret name.")
    key: str = Field(default="token", min_length=1, max_length=253, description="Key within the Secret.")


class PVCSource(_Model):
    """Model weights on a PersistentVolumeClaim, mounted read-only."""

    claim_name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="PVC name in the same namespace.")
    path: str = Field(
        default="",
        max_length=1024,
        pattern=r"^[^/].*$|^$",
        description="Directory of the model inside the volume (relative); empty for the volume root.",
    )


class HubSource(_Model):
    """A model downloaded from the Hugging Face hub at start-up."""

    id: str = Field(
        min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$", description="Hub id, e.g. Qwen/Qwen2.5-Coder-3B-Instruct."
    )
    revision: str | None = Field(default=None, max_length=128, description="Branch, tag or commit.")
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret holding the hub token (never inline); set as HF_TOKEN."
    )


class ModelSource(_Model):
    """Where the weights come from: exactly one of pvc or hub."""

    pvc: PVCSource | None = None
    hub: HubSource | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        if (self.pvc is None) == (self.hub is None):
            raise ValueError("model.source needs exactly one of pvc or hub")
        return self


class ModelSpec(_Model):
    name: str = Field(
        min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][\w.\-/:]*$", description="Served model name clients ask for."
    )
    source: ModelSource | None = Field(
        default=None, description="Weights for the vllm engine; the emulator needs none."
    )


class Resources(_Model):
    """Container resources, as in a Pod (quantities as strings or integers)."""

    requests: dict[str, Quantity] = Field(default_factory=dict, description="Requested resources.")
    limits: dict[str, Quantity] = Field(
        default_factory=dict, description=f"Resource limits; {GPU_RESOURCE} gives the engine GPUs."
    )


class Toleration(_Model):
    key: str | None = Field(default=None, max_length=316)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)


class EngineSpec(_Model):
    """The inference engine container: vLLM's OpenAI server, or saber's emulator."""

    kind: Literal["vllm", "emulator"] = Field(default="vllm", description="vllm (real engine) or emulator.")
    image: str | None = Field(
        default=None, max_length=512, description="Container image; defaults to vLLM's official image or the saber image."
    )
    max_model_len: int | None = Field(default=None, ge=16, le=10_000_000, description="vLLM --max-model-len.")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="vLLM --gpu-memory-utilization.")
    max_num_seqs: int = Field(
        default=256, ge=1, le=8192, description="vLLM --max-num-seqs: keep it large; the sidecar's policy gates admission."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="vLLM --tensor-parallel-size (GPUs per pod).")
    extra_args: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=64, description="More engine arguments, appended verbatim."
    )
    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod node selector.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32, description="Pod tolerations.")


class SidecarSpec(_Model):
    image: str | None = Field(default=None, max_length=512, description="Saber image; defaults to the operator's.")
    port: int = Field(default=8080, ge=1024, le=65535, description="Sidecar port (proxy, health and metrics).")
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "250m", "memory": "256Mi"}, limits={"memory": "512Mi"})
    )


class CalibrationSpec(_Model):
    """An active measurement of the engine (`saber calibrate`, run as a one-off Job against one ready
    pod's engine); the profile it writes becomes the sidecars' prior (`scheduling.engineProfile`)."""

    enabled: bool = Field(
        default=False,
        description="Run a calibration Job whenever the engine spec has no profile measured yet (and after each "
        "engine change); the result overrides scheduling.engineProfile.",
    )
    image: str | None = Field(
        default=None, max_length=512, description="Image with `saber calibrate`; defaults to the sidecar's image."
    )
    max_concurrency: int | None = Field(
        default=None, ge=1, le=8192,
        description="Highest concurrency measured (`--max-concurrency`); unset: the calibrator's default.",
    )
    duration_seconds: int | None = Field(
        default=None, ge=10, le=3600,
        description="Rough measurement time (`--duration`); unset: the calibrator's default (a few minutes).",
    )
    extra_args: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=32, description="More `saber calibrate` arguments, appended verbatim."
    )
    timeout_seconds: int = Field(
        default=1800, ge=60, le=86_400, description="The Job's activeDeadlineSeconds: a run past it fails."
    )
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "250m", "memory": "256Mi"}, limits={"memory": "512Mi"}),
        description="The calibration container's resources (it only sends requests).",
    )


class ServiceSpec(_Model):
    port: int = Field(default=80, ge=1, le=65535, description="Service port; traffic goes to the sidecar.")
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(default="ClusterIP", description="Service type.")


SLA_SCHEMA = WithJsonSchema(sla_json_schema())
SCHEDULING_SCHEMA = WithJsonSchema(scheduling_json_schema())


class SaberServiceSpec(_Model):
    """A served code LLM with an SLA-aware admission sidecar in front of it."""

    model: ModelSpec
    engine: EngineSpec = Field(default_factory=EngineSpec)
    replicas: int = Field(default=1, ge=0, le=1000, description="Pods, each an engine with its sidecar.")
    sla: Annotated[dict[str, Any], SLA_SCHEMA] = Field(description="SLA classes (the sidecar's config).")
    scheduling: Annotated[dict[str, Any], SCHEDULING_SCHEMA] = Field(
        default_factory=dict, description="Admission policy."
    )
    sidecar: SidecarSpec = Field(default_factory=SidecarSpec)
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    @model_validator(mode="after")
    def _check(self) -> SaberServiceSpec:
        self.sidecar_config()  # raises ValueError with the field paths a user sees
        if self.engine.kind == "vllm" and self.model.source is None:
            raise ValueError("engine.kind vllm needs model.source (pvc or hub)")
        if self.sidecar.port == ENGINE_PORT:
            raise ValueError(f"sidecar.port {ENGINE_PORT} is the engine's port in the pod; pick another")
        return self

    def sidecar_config(self, engine_profile: dict[str, Any] | None = None) -> SidecarConfig:
        """The sidecar's config: `sla` and `scheduling`, plus what the operator knows about the
        engine: its seat limit (`engine.maxNumSeqs`) and, when given, a calibrated profile, which
        takes precedence over a pasted `scheduling.engineProfile`."""
        for name, why in OPERATOR_SET_SCHEDULING.items():
            if name in self.scheduling:
                raise ValueError(f"spec.scheduling.{name} must not be set: {why}")
        data = snake_keys({**self.sla, "scheduling": self.scheduling})
        data["scheduling"]["engine_max_num_seqs"] = self.engine.max_num_seqs
        if engine_profile is not None:
            data["scheduling"]["engine_profile"] = engine_profile  # snake_case already (LatencyProfile dump)
        try:
            return SidecarConfig.model_validate(data)
        except ValidationError as exc:
            raise ValueError(_format_errors(exc, "spec.sla.")) from None


def problems(spec: SaberServiceSpec) -> list[str]:
    """Combinations the schema cannot express; each message says what to fix."""
    found: list[str] = []
    engine = spec.engine
    if engine.kind == "vllm":
        gpus = engine.resources.limits.get(GPU_RESOURCE)
        try:
            gpu_count = int(gpus) if gpus is not None else 0
        except ValueError:
            gpu_count = -1
        if gpu_count < 0:
            found.append(f"engine.resources.limits[{GPU_RESOURCE}] must be a whole number, got {gpus!r}")
        elif gpu_count == 0:
            found.append(f"engine.kind vllm needs engine.resources.limits[{GPU_RESOURCE}] (at least 1)")
        elif gpu_count < engine.tensor_parallel_size:
            found.append(
                f"engine.tensorParallelSize {engine.tensor_parallel_size} needs as many GPUs, but "
                f"engine.resources.limits[{GPU_RESOURCE}] is {gpu_count}"
            )
    managed = {
        "--port": "the operator sets it",
        "--host": "the operator sets it",
        "--model": "set model.source",
        "--served-model-name": "set model.name",
        "--max-model-len": "set engine.maxModelLen",
        "--gpu-memory-utilization": "set engine.gpuMemoryUtilization",
        "--max-num-seqs": "set engine.maxNumSeqs",
        "--tensor-parallel-size": "set engine.tensorParallelSize",
        "-tp": "set engine.tensorParallelSize",
    }
    for arg in engine.extra_args:
        flag = arg.split("=", 1)[0]
        if flag in managed:
            found.append(f"engine.extraArgs must not contain {flag}: {managed[flag]}")
    return found


def parse_spec(raw: dict[str, Any]) -> SaberServiceSpec:
    """Validate a resource's spec; ValueError carries a message naming the fields to fix."""
    try:
        spec = SaberServiceSpec.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(_format_errors(exc, "spec.")) from None
    found = problems(spec)
    if found:
        raise ValueError("; ".join(found))
    return spec


# --- status ----------------------------------------------------------------------------------------

ConditionType = Literal["Ready", "Progressing", "Degraded", "SLAMet", "Calibrated"]


class Condition(_Model):
    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field(default="", max_length=32768)
    observed_generation: int | None = Field(default=None, ge=0)
    last_transition_time: str | None = Field(default=None, description="RFC 3339 time of the last status change.")


class ClassStatus(_Model):
    name: str
    attainment: float | None = Field(default=None, ge=0, le=1, description="Share of requests meeting the SLA.")
    target: float = Field(ge=0, le=1, description="The class's target attainment.")
    requests: float = Field(
        default=0, ge=0, description="Requests seen by the sidecars since they started (counter sum)."
    )


class EngineModelStatus(_Model):
    """The engine model the sidecars learned online (their `saber_engine_*` metrics). Each figure is
    the mean over the pods that report it, weighted by each pod's confidence (a plain mean when no
    pod is confident yet); `observations` is their sum."""

    prefill_seconds_per_token: float | None = Field(
        default=None, ge=0, description="Engine seconds one prompt token's prefill costs."
    )
    speed_tokens_per_second: dict[str, float] = Field(
        default_factory=dict, description="Decode speed per sequence (tokens/s) by batch size (the key)."
    )
    confidence: float | None = Field(default=None, ge=0, le=1, description="Mean confidence of the pods' models.")
    observations: float = Field(default=0, ge=0, description="Finished requests the models learned from, all pods.")
    pods: int = Field(default=0, ge=0, description="Pods that reported an engine model.")


CalibrationPhase = Literal["Pending", "Running", "Succeeded", "Failed"]


class CalibrationStatus(_Model):
    """Where spec.calibration stands; the last good profile stays in use while a new run goes on or fails."""

    phase: CalibrationPhase = Field(description="Pending (no ready pod of this engine yet), Running, Succeeded, Failed.")
    reason: str = Field(default="", max_length=128)
    message: str = Field(default="", max_length=4096)
    engine_hash: str = Field(default="", max_length=64, description="The engine spec being (or last) calibrated.")
    job: str | None = Field(default=None, description="The calibration Job of this engine spec.")
    config_map: str | None = Field(
        default=None, description="ConfigMap holding the last good profile (key profile.yaml)."
    )
    profile_engine_hash: str | None = Field(
        default=None, max_length=64, description="The engine spec the profile in use was measured on."
    )
    measured_at: str | None = Field(default=None, description="RFC 3339 time the profile in use was stored.")
    last_transition_time: str | None = Field(default=None, description="RFC 3339 time the phase last changed.")


class SaberServiceStatus(_Model):
    observed_generation: int | None = Field(default=None, ge=0)
    replicas: int = Field(default=0, ge=0, description="Pods of the current Deployment.")
    ready_replicas: int = Field(default=0, ge=0)
    selector: str = Field(default="", description="Label selector of the pods (scale subresource).")
    policy: str = Field(default="", description="Admission policy in effect.")
    sla_attainment: float | None = Field(
        default=None, ge=0, le=1, description="Request-weighted SLA attainment over all classes."
    )
    goodput_requests_per_second: float | None = Field(
        default=None, ge=0, description="Requests per second finishing within their SLA, all pods."
    )
    admission_limit: float | None = Field(default=None, ge=0, description="Sum of the sidecars' admission limits.")
    classes: list[ClassStatus] = Field(default_factory=list)
    engine_model: EngineModelStatus | None = Field(default=None, description="The engine model the sidecars learned.")
    calibration: CalibrationStatus | None = Field(default=None, description="spec.calibration's progress.")
    conditions: list[Condition] = Field(default_factory=list)
