"""Calibration's pure parts: a Job's outcome from its status and pods, the termination message as
a LatencyProfile, which pod gets measured, and the status each phase reports."""

from __future__ import annotations

import pytest
import yaml

from saber_operator import builders
from saber_operator.calibration import Stored, describe, job_outcome, parse_profile, pick_pod, read_stored

PROFILE = {
    "name": "vllm-cpu", "description": "saber calibrate", "decode_batch_sizes": [1, 2, 4, 8],
    "decode_step_s": [0.02, 0.021, 0.024, 0.03], "prefill_s_per_token": 0.0014,
}


def pod(name: str, terminated: dict | None = None, **status) -> dict:
    statuses = [{"name": "calibrate", "state": {"terminated": terminated} if terminated else {"running": {}}}]
    return {"metadata": {"name": name}, "status": {"containerStatuses": statuses, **status}}


def test_job_outcome():
    assert job_outcome({"status": {"active": 1}}, [pod("p")]).state == "running"
    text = yaml.safe_dump(PROFILE)
    done = job_outcome({"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}},
                       [pod("p1", {"exitCode": 1, "message": "boom"}), pod("p2", {"exitCode": 0, "message": text})])
    assert done.state == "succeeded" and done.message == text
    failed = job_outcome(
        {"status": {"failed": 2, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}},
        [pod("p1", {"exitCode": 2, "message": "error: cannot reach http://10.0.0.1:8000: connection refused"})],
    )
    assert failed.state == "failed"
    assert "backoff limit" in failed.message and "connection refused" in failed.message
    # A condition that is not True does not count; a success whose pod is gone is a failure to read.
    assert job_outcome({"status": {"conditions": [{"type": "Failed", "status": "False"}]}}, []).state == "running"
    lost = job_outcome({"status": {"succeeded": 1}}, [])
    assert lost.state == "failed" and "pod" in lost.message


def test_parse_profile():
    assert parse_profile(yaml.safe_dump(PROFILE))["prefill_s_per_token"] == 0.0014
    with pytest.raises(ValueError, match="wrote nothing"):
        parse_profile("  \n")
    with pytest.raises(ValueError, match="not YAML"):
        parse_profile("a: [1,")
    with pytest.raises(ValueError, match="decode_step_s"):
        parse_profile(yaml.safe_dump({**PROFILE, "decode_step_s": [0.03, 0.02, 0.01, 0.005]}))
    with pytest.raises(ValueError, match="not a latency profile"):
        parse_profile("Traceback (most recent call last):\n  ...")
    with pytest.raises(ValueError, match="4096-byte limit"):
        parse_profile(yaml.safe_dump({**PROFILE, "description": "x" * 3990}))


def ready_pod(name: str, engine_hash: str, ip: str = "10.0.0.1", ready: str = "True", **meta) -> dict:
    return {
        "metadata": {"name": name, "annotations": {builders.ENGINE_HASH_ANNOTATION: engine_hash}, **meta},
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": ready}]},
    }


def test_pick_pod_measures_only_a_ready_pod_of_the_current_engine():
    pods = [
        ready_pod("c", "old"),  # the previous engine spec, mid-rollout
        ready_pod("b", "new", ready="False"),
        ready_pod("a", "new", deletionTimestamp="2026-01-01T00:00:00Z"),
        ready_pod("e", "new", ip="10.0.0.5"),
        ready_pod("d", "new", ip="10.0.0.4"),
    ]
    assert pick_pod(pods, "new")["status"]["podIP"] == "10.0.0.4"
    assert pick_pod(pods[:3], "new") is None


def test_read_stored_needs_our_owner_and_a_valid_profile():
    cm = builders.build_calibration_configmap(builders.Owner("s", "n", "uid-1"), yaml.safe_dump(PROFILE), "h", "k", "j", "T")
    stored = read_stored(cm, "uid-1")
    assert stored == Stored(parse_profile(yaml.safe_dump(PROFILE)), "k", "h", "T")
    assert read_stored(cm, "someone-else") is None and read_stored(None, "uid-1") is None
    cm["data"]["profile.yaml"] = "garbage: ["
    assert read_stored(cm, "uid-1") == Stored(None, None, None, None)


def test_describe_says_what_to_fix_and_what_stays_in_use():
    stored = Stored({"name": "x"}, "k0", "oldhash", "T0")
    kw = dict(engine_hash="newhash", namespace="team-a", config_map="s-calibration", generation=3, now="T1")
    status, cond = describe("Failed", "JobFailed", "calibration Job j failed: boom", job="j", stored=stored, old=None, **kw)
    assert cond.type == "Calibrated" and cond.status == "False" and cond.observed_generation == 3
    assert "kubectl -n team-a delete job j" in cond.message
    assert "keep the profile measured on engine oldhash" in cond.message
    assert status.phase == "Failed" and status.config_map == "s-calibration" and status.profile_engine_hash == "oldhash"
    assert status.last_transition_time == "T1"
    # Still failed on the next pass: the phase's transition time stays.
    later = {**kw, "now": "T2"}
    again, _ = describe("Failed", "JobFailed", "x", job="j", stored=stored, old=status.model_dump(by_alias=True), **later)
    assert again.last_transition_time == "T1"
    rerun, _ = describe("Running", "Measuring", "x", job="j", stored=stored, old=status.model_dump(by_alias=True), **later)
    assert rerun.last_transition_time == "T2"
    running, cond = describe("Running", "Measuring", "Job j is measuring", job="j", stored=None, old=None, **kw)
    assert cond.status == "Unknown" and "built-in prior" in cond.message and running.config_map is None


class RefusingKube:
    """A stand-in KubeClient (no API server in a unit test): serves one ConfigMap, refuses Jobs."""

    def __init__(self, cm: dict) -> None:
        self.cm = cm

    async def get(self, api_version: str, plural: str, namespace: str, name: str) -> dict | None:
        if plural == "configmaps":
            return self.cm if name == self.cm["metadata"]["name"] else None
        raise RuntimeError("HTTP 403: jobs.batch is forbidden")


async def test_an_api_error_keeps_the_profile_and_says_to_check_rbac():
    from saber_operator.calibration import reconcile_calibration
    from saber_operator.spec import parse_spec

    owner = builders.Owner("s", "n", "uid-1")
    spec = parse_spec({
        "model": {"name": "m"}, "engine": {"kind": "emulator"}, "calibration": {"enabled": True},
        "sla": {"classes": [{"name": "a", "deadlineSeconds": 1}], "defaultClass": "a"},
    })
    cm = builders.build_calibration_configmap(owner, yaml.safe_dump(PROFILE), "old", "oldkey", "j", "T0")
    result = await reconcile_calibration(RefusingKube(cm), owner, spec, "new", saber_image="img", now="T1",
                                         generation=1, old=None)
    assert result.profile == parse_profile(yaml.safe_dump(PROFILE))  # the sidecars keep the last good profile
    assert result.status.phase == "Pending" and result.status.reason == "APIError"
    assert result.condition.status == "Unknown" and "403" in result.condition.message
    assert "RBAC" in result.condition.message
