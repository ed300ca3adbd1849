"""spec.calibration: run `saber calibrate` as a one-off Job, keep its profile, feed it to the sidecars.

Level-based like the rest of the operator: what to do is decided from the objects that exist now,
never from what happened before. The calibration ConfigMap records which engine (and which
measurement settings) its profile was measured on, as the annotation `saber.dev/calibration-key`:
- its key matches the current one: calibrated, nothing to do;
- otherwise the Job named after the current key is looked up: missing, it is created against one
  ready pod that runs the current engine spec; running, we wait; succeeded, its pod's termination
  message (the profile, under 4 KB) is validated and stored; failed, the status says why and how
  to retry (delete the Job), and the last good profile stays in use.
The Job's pod has no API access: the operator reads its result from the pod status.

`job_outcome`, `parse_profile`, `pick_pod` and `describe` are pure; `reconcile_calibration` does
the I/O through the KubeClient it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from saber_emulator.profile import LatencyProfile
from saber_operator import builders
from saber_operator.spec import CalibrationStatus, Condition, SaberServiceSpec

log = logging.getLogger("saber.operator")

MAX_PROFILE_BYTES = 4096  # the kubelet keeps at most 4096 bytes of a termination message


@dataclass(frozen=True)
class Outcome:
    state: Literal["running", "succeeded", "failed"]
    message: str = ""


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == builders.CALIBRATION_CONTAINER:
            return ((cs.get("state") or {}).get("terminated")) or None
    return None


def job_outcome(job: dict[str, Any], pods: list[dict[str, Any]]) -> Outcome:
    """Where a calibration Job stands, with the profile (succeeded) or the error text (failed)."""
    status = job.get("status") or {}
    true = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    finished = [(p, t) for p in pods if (t := _terminated(p)) is not None]
    if "Failed" in true:
        cond = true["Failed"]
        why = cond.get("message") or cond.get("reason") or "the Job failed"
        failed = [t for _, t in finished if t.get("exitCode") not in (0, None)]
        detail = (failed[-1].get("message") or "").strip() if failed else ""
        return Outcome("failed", f"{why}; last output: {detail[-1500:]}" if detail else why)
    if "Complete" in true or int(status.get("succeeded") or 0) >= 1:
        done = [t for _, t in finished if t.get("exitCode") == 0]
        if not done:
            return Outcome("failed", "the Job succeeded but its pod, which holds the result, is gone")
        return Outcome("succeeded", done[-1].get("message") or "")
    return Outcome("running")


def parse_profile(text: str) -> dict[str, Any]:
    """The termination message as a LatencyProfile (snake_case dict); ValueError says what is wrong."""
    if not text.strip():
        raise ValueError("the calibration wrote nothing to /dev/termination-log")
    if len(text.encode()) >= MAX_PROFILE_BYTES:
        raise ValueError(f"the output reached the kubelet's {MAX_PROFILE_BYTES}-byte limit and may be cut off")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not YAML: {exc}") from None
    try:
        profile = LatencyProfile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"not a latency profile: {problems}") from None
    return profile.model_dump(mode="json")


def _ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    conds = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    return (
        status.get("phase") == "Running"
        and bool(status.get("podIP"))
        and conds.get("Ready") == "True"
        and not (pod.get("metadata") or {}).get("deletionTimestamp")
    )


def pick_pod(pods: list[dict[str, Any]], engine_hash: str) -> dict[str, Any] | None:
    """A ready serving pod that runs the engine spec to measure (pods copy the template's
    engine-hash annotation, so a pod of the previous spec mid-rollout is never measured)."""
    fit = [
        p for p in pods
        if _ready(p) and ((p.get("metadata") or {}).get("annotations") or {}).get(builders.ENGINE_HASH_ANNOTATION)
        == engine_hash
    ]
    return min(fit, key=lambda p: p["metadata"]["name"]) if fit else None


@dataclass
class CalibrationResult:
    """What the reconcile writes: the status section, its condition, and the profile the sidecars use."""

    status: CalibrationStatus | None
    condition: Condition | None
    profile: dict[str, Any] | None


@dataclass(frozen=True)
class Stored:
    """The calibration ConfigMap as found: its profile (None if unreadable) and what it was measured on."""

    profile: dict[str, Any] | None
    key: str | None
    engine_hash: str | None
    measured_at: str | None


def read_stored(cm: dict[str, Any] | None, owner_uid: str) -> Stored | None:
    if cm is None or not any(r.get("uid") == owner_uid for r in (cm.get("metadata") or {}).get("ownerReferences") or []):
        return None
    notes = (cm.get("metadata") or {}).get("annotations") or {}
    try:
        profile: dict[str, Any] | None = parse_profile((cm.get("data") or {}).get(builders.CALIBRATION_FILE) or "")
    except ValueError as exc:  # hand-edited into something unusable: treat as no profile, re-measure
        log.warning("calibration ConfigMap %s holds no usable profile: %s", cm["metadata"].get("name"), exc)
        return Stored(None, None, None, None)
    return Stored(
        profile,
        notes.get(builders.CALIBRATION_KEY_ANNOTATION),
        notes.get(builders.ENGINE_HASH_ANNOTATION),
        notes.get(builders.MEASURED_AT_ANNOTATION),
    )


def describe(
    phase: str,
    reason: str,
    detail: str,
    *,
    engine_hash: str,
    job: str | None,
    stored: Stored | None,
    namespace: str,
    config_map: str,
    generation: int | None,
    now: str,
    old: dict[str, Any] | None,
) -> tuple[CalibrationStatus, Condition]:
    """Status and condition for a phase. Calibrated is Unknown while pending or running, so a failure
    after a run is a transition (and so an event)."""
    have = stored is not None and stored.profile is not None
    keeping = (
        f"the sidecars keep the profile measured on engine {stored.engine_hash} (ConfigMap {config_map})"
        if have and stored is not None else "the sidecars keep their built-in prior"
    )
    status_: Literal["True", "False", "Unknown"]
    if phase == "Succeeded":
        status_, message = "True", f"{detail}; the sidecars use it (ConfigMap {config_map}, key {builders.CALIBRATION_FILE})"
    elif phase == "Failed":
        retry = f", then delete the Job to run it again: kubectl -n {namespace} delete job {job}" if job else ""
        status_, message = "False", f"{detail}. Fix the cause{retry}; meanwhile {keeping}"
    else:
        status_, message = "Unknown", f"{detail}; meanwhile {keeping}"
    previous = old or {}
    transition = previous.get("lastTransitionTime") if previous.get("phase") == phase else None
    status = CalibrationStatus(
        phase=phase,  # type: ignore[arg-type]
        reason=reason,
        message=message[:4096],
        engine_hash=engine_hash,
        job=job,
        config_map=config_map if have else None,
        profile_engine_hash=stored.engine_hash if have and stored is not None else None,
        measured_at=stored.measured_at if have and stored is not None else None,
        last_transition_time=transition or now,
    )
    condition = Condition(
        type="Calibrated", status=status_, reason=reason, message=message[:4096], observed_generation=generation
    )
    return status, condition


async def reconcile_calibration(
    kube: Any,
    owner: builders.Owner,
    spec: SaberServiceSpec,
    engine_hash: str,
    *,
    saber_image: str,
    now: str,
    generation: int | None,
    old: dict[str, Any] | None,
) -> CalibrationResult:
    """One level-based step of calibration (see the module docstring). `kube` is a KubeClient."""
    if not spec.calibration.enabled:
        return CalibrationResult(None, None, None)
    ns = owner.namespace
    cm_name = builders.calibration_configmap_name(owner)
    stored = read_stored(await kube.get("v1", "configmaps", ns, cm_name), owner.uid)
    profile = stored.profile if stored else None
    key = builders.calibration_key(spec, engine_hash)
    job_name = builders.calibration_job_name(owner, key)

    def done(
        phase: str, reason: str, detail: str, job: str | None = job_name, stored: Stored | None = stored
    ) -> CalibrationResult:
        status, cond = describe(
            phase, reason, detail, engine_hash=engine_hash, job=job, stored=stored, namespace=ns,
            config_map=cm_name, generation=generation, now=now, old=old,
        )
        return CalibrationResult(status, cond, stored.profile if stored else None)

    if stored is not None and profile is not None and stored.key == key:
        return done("Succeeded", "Calibrated", f"profile measured on engine {engine_hash} at {stored.measured_at}")

    try:
        return await _run(kube, owner, spec, engine_hash, key, job_name, saber_image, now, done)
    except Exception as exc:  # a calibration problem must never keep the children from being applied
        log.warning("calibration of %s/%s: %s", ns, owner.name, exc)
        # Unknown rather than Failed: an API blip must not flap the condition and post Warnings; a
        # lasting cause (RBAC) stays visible in the status and the log.
        return done("Pending", "APIError", f"could not read or start the calibration Job {job_name}: {exc}; check "
                    "the operator's RBAC (batch jobs: get, create, patch; pods: list)", job=None)


async def _run(
    kube: Any,
    owner: builders.Owner,
    spec: SaberServiceSpec,
    engine_hash: str,
    key: str,
    job_name: str,
    saber_image: str,
    now: str,
    done: Callable[..., CalibrationResult],
) -> CalibrationResult:
    ns = owner.namespace
    cm_name = builders.calibration_configmap_name(owner)
    job = await kube.get("batch/v1", "jobs", ns, job_name)
    if job is None:
        pods = await kube.list("v1", "pods", ns, builders.selector_labels(owner))
        pod = pick_pod(pods, engine_hash)
        if pod is None:
            return done("Pending", "WaitingForPod", f"waiting for a ready pod running engine spec {engine_hash}", job=None)
        await kube.apply(builders.build_calibration_job(owner, spec, pod["status"]["podIP"], engine_hash, saber_image))
        log.info("calibration Job %s/%s started against pod %s", ns, job_name, pod["metadata"]["name"])
        return done("Running", "JobCreated", f"Job {job_name} is measuring pod {pod['metadata']['name']}")
    if not any(r.get("uid") == owner.uid for r in (job.get("metadata") or {}).get("ownerReferences") or []):
        return done("Failed", "JobNotOwned", f"Job {job_name} exists but does not belong to this SaberService")

    pods = await kube.list("v1", "pods", ns, {builders.CALIBRATION_JOB_LABEL: job_name})
    outcome = job_outcome(job, pods)
    if outcome.state == "running":
        return done("Running", "Measuring", f"Job {job_name} is measuring the engine")
    if outcome.state == "failed":
        return done("Failed", "JobFailed", f"calibration Job {job_name} failed: {outcome.message}")
    try:
        new_profile = parse_profile(outcome.message)
    except ValueError as exc:
        image = spec.calibration.image or spec.sidecar.image or saber_image
        return done(
            "Failed", "InvalidProfile",
            f"Job {job_name} finished but its output is not usable ({exc}); check that image {image} has a "
            "`saber calibrate` that writes a LatencyProfile to --out",
        )
    text = yaml.safe_dump(new_profile, sort_keys=False)
    await kube.apply(builders.build_calibration_configmap(owner, text, engine_hash, key, job_name, now))
    log.info("calibration of %s/%s stored in ConfigMap %s", ns, owner.name, cm_name)
    return done("Succeeded", "Calibrated", f"profile measured on engine {engine_hash} at {now} by Job {job_name}",
                stored=Stored(new_profile, key, engine_hash, now))
