"""The Argo CD health check (Lua) for SaberService, run in Lua 5.1 (the dialect of Argo CD's
gopher-lua) through lupa, on objects whose conditions come from the operator's own status logic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lupa.lua51 as lua51  # a test dependency: runs the health check in Argo CD's Lua dialect
import yaml

from saber_operator.spec import ClassStatus, SaberServiceStatus
from saber_operator.status import SLAFigures, deployment_conditions, sla_condition

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "manifests" / "argocd" / "saberservice-health.lua"
CM_PATCH = ROOT / "manifests" / "argocd" / "argocd-cm-patch.yaml"
HEALTH_KEY = "resource.customizations.health.saber.dev_SaberService"


def _to_lua(runtime, value: Any):
    if isinstance(value, dict):
        return runtime.table_from({k: _to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([_to_lua(runtime, v) for v in value])
    return value


def health(obj: dict[str, Any]) -> dict[str, str]:
    """Run the script as Argo CD does: `obj` is a global, the chunk returns the health table."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = _to_lua(runtime, obj)
    result = runtime.execute(SCRIPT.read_text())
    return dict(result)


def saberservice(generation: int = 3, status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "saber.dev/v1alpha1",
        "kind": "SaberService",
        "metadata": {"name": "coder", "namespace": "llm", "generation": generation},
        "spec": {"model": {"name": "m"}, "replicas": 2},
    }
    if status is not None:
        obj["status"] = status
    return obj


def operator_status(deployment: dict[str, Any] | None, generation: int = 3, desired: int = 2,
                    sla_below: bool = False) -> dict[str, Any]:
    conditions, replicas, ready = deployment_conditions(desired, deployment, generation)
    figures = SLAFigures(
        classes=[ClassStatus(name="qna", attainment=0.5 if sla_below else 0.99, target=0.95, requests=10)],
        overall=None, goodput=None, admission_limit=None,
    )
    conditions.append(sla_condition(figures, generation))
    status = SaberServiceStatus(observed_generation=generation, replicas=replicas, ready_replicas=ready,
                                conditions=conditions)
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def deployment(ready: int, replicas: int = 2, updated: int = 2, stuck: bool = False) -> dict[str, Any]:
    conditions = []
    if stuck:
        conditions.append({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                           "message": 'ReplicaSet "coder-7d9" has timed out progressing.'})
    return {
        "metadata": {"generation": 5},
        "status": {"observedGeneration": 5, "replicas": replicas, "readyReplicas": ready,
                   "updatedReplicas": updated, "conditions": conditions},
    }


def test_the_configmap_patch_carries_the_script_verbatim():
    patch = yaml.safe_load(CM_PATCH.read_text())
    assert patch["kind"] == "ConfigMap" and patch["metadata"]["name"] == "argocd-cm"
    assert patch["data"][HEALTH_KEY] == SCRIPT.read_text()


def test_all_replicas_ready_is_healthy():
    h = health(saberservice(status=operator_status(deployment(ready=2))))
    assert h["status"] == "Healthy"
    assert "2/2 replicas ready" in h["message"]


def test_missing_sla_stays_healthy_but_says_so():
    h = health(saberservice(status=operator_status(deployment(ready=2), sla_below=True)))
    assert h["status"] == "Healthy"
    assert "SLAMet=False (BelowTarget)" in h["message"]


def test_rollout_in_progress_is_progressing():
    h = health(saberservice(status=operator_status(deployment(ready=1, updated=1))))
    assert h["status"] == "Progressing"
    assert "Ready=False" in h["message"] and "RollingOut" in h["message"]


def test_stuck_rollout_is_degraded():
    h = health(saberservice(status=operator_status(deployment(ready=0, updated=1, stuck=True))))
    assert h["status"] == "Degraded"
    assert "RolloutStuck" in h["message"] and "timed out progressing" in h["message"]


def test_no_deployment_yet_is_progressing():
    h = health(saberservice(status=operator_status(None)))
    assert h["status"] == "Progressing"


def test_no_status_yet_is_progressing():
    h = health(saberservice())
    assert h == {"status": "Progressing", "message": "Waiting for the saber operator to report status"}
    assert health(saberservice(status={"conditions": []}))["status"] == "Progressing"


def test_status_of_an_older_generation_is_progressing():
    # The spec changed (generation 4) but the operator last reported on generation 3, when all was Ready.
    h = health(saberservice(generation=4, status=operator_status(deployment(ready=2), generation=3)))
    assert h["status"] == "Progressing"
    assert "generation 4" in h["message"]


def test_ready_false_without_progress_is_degraded():
    status = {"observedGeneration": 3, "conditions": [
        {"type": "Ready", "status": "False", "reason": "ReplicasNotReady", "message": "0/2 replicas ready"},
        {"type": "Progressing", "status": "False", "reason": "Stable", "message": ""},
    ]}
    h = health(saberservice(status=status))
    assert h == {"status": "Degraded", "message": "Ready=False (ReplicasNotReady): 0/2 replicas ready"}


def test_scaled_to_zero_is_healthy():
    h = health(saberservice(status=operator_status(deployment(ready=0, replicas=0, updated=0), desired=0)))
    assert h["status"] == "Healthy"
    assert "ScaledToZero" in h["message"]
