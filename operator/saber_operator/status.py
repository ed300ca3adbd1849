"""Pure status logic: sidecar metrics -> per-class figures; children -> conditions.

Everything here takes its inputs (metrics text, the Deployment's status, `now`) as arguments,
so tests need neither a cluster nor a clock.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client.parser import text_string_to_metric_families

from saber_operator.spec import ClassStatus, Condition, ConditionType, EngineModelStatus, SaberServiceStatus
from saber_sidecar.config import SidecarConfig

ATTAINMENT = "saber_sla_attainment_ratio"
GOODPUT = "saber_goodput_requests_per_second"
REQUESTS = "saber_requests_total"
WINDOW_REQUESTS = "saber_sla_window_requests"
ADMISSION_LIMIT = "saber_admission_limit"
# The sidecar's learned engine model (names agreed with the sidecar).
ENGINE_SPEED = "saber_engine_speed_tokens_per_second"  # {batch="1"|"2"|...}: per-sequence decode speed
ENGINE_PREFILL = "saber_engine_prefill_seconds_per_token"
ENGINE_CONFIDENCE = "saber_engine_model_confidence"  # 0..1
ENGINE_OBSERVATIONS = "saber_engine_model_observations_total"


@dataclass
class PodMetrics:
    """What one sidecar reports."""

    attainment: dict[str, float] = field(default_factory=dict)
    requests: dict[str, float] = field(default_factory=dict)  # per class, all outcomes, since start
    window_requests: dict[str, float] = field(default_factory=dict)  # per class, behind `attainment`
    goodput: float | None = None
    admission_limit: float | None = None
    speed: dict[int, float] = field(default_factory=dict)  # batch size -> tokens/s
    prefill_seconds_per_token: float | None = None
    confidence: float | None = None
    observations: float | None = None


def parse_sidecar_metrics(text: str) -> PodMetrics:
    """Parse a sidecar's /metrics (Prometheus text format); unknown metrics are ignored."""
    out = PodMetrics()
    requests: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if value != value:  # NaN: no data for this class yet
                continue
            if name == ATTAINMENT and "class" in labels:
                out.attainment[labels["class"]] = value
            elif name == REQUESTS and "class" in labels:
                requests[labels["class"]] += value
            elif name == WINDOW_REQUESTS and "class" in labels:
                out.window_requests[labels["class"]] = value
            elif name == GOODPUT:
                out.goodput = (out.goodput or 0.0) + value
            elif name == ADMISSION_LIMIT:
                out.admission_limit = (out.admission_limit or 0.0) + value
            elif name == ENGINE_SPEED and labels.get("batch", "").isdigit() and value >= 0:
                out.speed[int(labels["batch"])] = value
            elif name == ENGINE_PREFILL and value >= 0:
                out.prefill_seconds_per_token = value
            elif name == ENGINE_CONFIDENCE:
                out.confidence = min(1.0, max(0.0, value))
            elif name == ENGINE_OBSERVATIONS and value >= 0:  # the parser names counter samples *_total
                out.observations = value
    out.requests = dict(requests)
    return out


@dataclass
class SLAFigures:
    classes: list[ClassStatus]
    overall: float | None
    goodput: float | None
    admission_limit: float | None


def aggregate(config: SidecarConfig, pods: list[PodMetrics]) -> SLAFigures:
    """Combine pods: each pod's attainment weighted by the requests behind it (its sliding window;
    a sidecar too old to export that falls back to its lifetime count)."""
    classes: list[ClassStatus] = []
    total_weight = 0.0
    total_met = 0.0
    for sla in config.classes:
        weighted = 0.0
        weight = 0.0
        plain: list[float] = []
        requests = 0.0
        for pod in pods:
            if sla.name not in pod.attainment:
                continue
            requests += pod.requests.get(sla.name, 0.0)
            n = pod.window_requests.get(sla.name, pod.requests.get(sla.name, 0.0))
            plain.append(pod.attainment[sla.name])
            weighted += pod.attainment[sla.name] * n
            weight += n
        if weight > 0:
            attainment: float | None = weighted / weight
        elif plain:
            attainment = sum(plain) / len(plain)
        else:
            attainment = None
        if attainment is not None:
            attainment = min(1.0, max(0.0, attainment))
            w = weight if weight > 0 else 1.0
            total_met += attainment * w
            total_weight += w
        classes.append(ClassStatus(name=sla.name, attainment=attainment, target=sla.target_attainment, requests=requests))
    goodputs = [p.goodput for p in pods if p.goodput is not None]
    limits = [p.admission_limit for p in pods if p.admission_limit is not None]
    return SLAFigures(
        classes=classes,
        overall=total_met / total_weight if total_weight else None,
        goodput=sum(goodputs) if goodputs else None,
        admission_limit=sum(limits) if limits else None,
    )


def engine_model_status(pods: list[PodMetrics]) -> EngineModelStatus | None:
    """The pods' learned engine models in one: each figure is the mean over the pods reporting it,
    weighted by the pod's confidence (a plain mean while no pod is confident), so one freshly
    started pod still on its prior does not drag the figure of a well-learned one. Confidence is
    the plain mean, observations the sum. None when no pod exports an engine model."""
    reporting = [p for p in pods if p.confidence is not None or p.speed or p.prefill_seconds_per_token is not None]
    if not reporting:
        return None

    def mean(values: list[tuple[float, float]]) -> float | None:  # (value, weight)
        if not values:
            return None
        total = sum(w for _, w in values)
        if total <= 0:
            return sum(v for v, _ in values) / len(values)
        return sum(v * w for v, w in values) / total

    weight = {id(p): p.confidence or 0.0 for p in reporting}
    batches = sorted({b for p in reporting for b in p.speed})
    speed = {str(b): mean([(p.speed[b], weight[id(p)]) for p in reporting if b in p.speed]) for b in batches}
    prefill = mean([(p.prefill_seconds_per_token, weight[id(p)]) for p in reporting
                    if p.prefill_seconds_per_token is not None])
    confidences = [p.confidence for p in reporting if p.confidence is not None]
    return EngineModelStatus(
        prefill_seconds_per_token=prefill,
        speed_tokens_per_second={k: v for k, v in speed.items() if v is not None},
        confidence=sum(confidences) / len(confidences) if confidences else None,
        observations=sum(p.observations or 0.0 for p in reporting),
        pods=len(reporting),
    )


def _cond(type_: ConditionType, status: Literal["True", "False", "Unknown"], reason: str, message: str, generation: int | None) -> Condition:
    return Condition(type=type_, status=status, reason=reason, message=message, observed_generation=generation)


def sla_condition(figures: SLAFigures, generation: int | None) -> Condition:
    known = [c for c in figures.classes if c.attainment is not None]
    if not known:
        return _cond("SLAMet", "Unknown", "NoData", "no sidecar has reported SLA attainment yet", generation)
    missing = [c for c in known if c.attainment < c.target]  # type: ignore[operator]
    if missing:
        detail = ", ".join(f"{c.name} {c.attainment:.3f} < {c.target:.3f}" for c in missing)
        return _cond("SLAMet", "False", "BelowTarget", f"classes below their target attainment: {detail}", generation)
    return _cond("SLAMet", "True", "TargetsMet", f"all {len(known)} reporting classes meet their targets", generation)


def deployment_conditions(
    desired_replicas: int, deployment: dict[str, Any] | None, generation: int | None
) -> tuple[list[Condition], int, int]:
    """Ready, Progressing and Degraded from the child Deployment; returns (conditions, replicas, ready)."""
    if deployment is None:
        return (
            [
                _cond("Ready", "False", "DeploymentMissing", "the Deployment has not been created yet", generation),
                _cond("Progressing", "True", "Creating", "creating the Deployment", generation),
                _cond("Degraded", "False", "AsExpected", "", generation),
            ],
            0,
            0,
        )
    status = deployment.get("status") or {}
    meta = deployment.get("metadata") or {}
    replicas = int(status.get("replicas") or 0)
    ready = int(status.get("readyReplicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    observed = status.get("observedGeneration")
    dep_gen = meta.get("generation")
    stale = dep_gen is not None and (observed is None or observed < dep_gen)
    stuck = next(
        (
            c
            for c in status.get("conditions") or []
            if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded"
        ),
        None,
    )

    if desired_replicas == 0:
        ready_c = _cond("Ready", "True", "ScaledToZero", "replicas is 0", generation)
    elif ready >= desired_replicas and not stale:
        ready_c = _cond("Ready", "True", "AllReplicasReady", f"{ready}/{desired_replicas} replicas ready", generation)
    else:
        ready_c = _cond("Ready", "False", "ReplicasNotReady", f"{ready}/{desired_replicas} replicas ready", generation)

    rolling = stale or updated < desired_replicas or replicas > desired_replicas or ready < desired_replicas
    if rolling:
        progressing = _cond(
            "Progressing", "True", "RollingOut",
            f"{updated}/{desired_replicas} updated, {ready} ready, {replicas} total", generation,
        )
    else:
        progressing = _cond("Progressing", "False", "Stable", "rollout complete", generation)

    if stuck is not None:
        degraded = _cond("Degraded", "True", "RolloutStuck", stuck.get("message") or "rollout deadline exceeded", generation)
    else:
        degraded = _cond("Degraded", "False", "AsExpected", "", generation)
    return [ready_c, progressing, degraded], replicas, ready


def merge_conditions(old: list[dict[str, Any]], new: list[Condition], now: str) -> list[Condition]:
    """Keep lastTransitionTime when a condition's status did not change."""
    previous = {c.get("type"): c for c in old}
    merged: list[Condition] = []
    for cond in new:
        before = previous.get(cond.type)
        if before is not None and before.get("status") == cond.status and before.get("lastTransitionTime"):
            cond = cond.model_copy(update={"last_transition_time": before["lastTransitionTime"]})
        else:
            cond = cond.model_copy(update={"last_transition_time": now})
        merged.append(cond)
    return merged


def transitions(old: list[dict[str, Any]], new: list[Condition]) -> list[Condition]:
    """Conditions whose status differs from before (new ones included): each gets an event."""
    previous = {c.get("type"): c.get("status") for c in old}
    return [c for c in new if previous.get(c.type) != c.status]


def event_type(cond: Condition) -> str:
    bad = (cond.type == "Degraded" and cond.status == "True") or (
        cond.type in ("Ready", "SLAMet", "Calibrated") and cond.status == "False"
    )
    return "Warning" if bad else "Normal"


def status_dict(status: SaberServiceStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)
