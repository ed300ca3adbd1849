"""spec.calibration reconciled by the real operator (kopf, HTTP) against kmock's Kubernetes API
*emulator* on loopback, and its result reaching the sidecar config.

No kube-apiserver, no Job controller and no kubelet run here: where Kubernetes would start the
calibration pod and record its exit, the test writes the Job's status and the pod (with the
termination message `saber calibrate` leaves in /dev/termination-log) itself, as those would.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from typing import Any

import aiohttp
import kmock
import pytest
import yaml

from operator_support import condition
from operator_support import eventually as _eventually
from saber_bench.perf.kubeapi import CONFIGMAPS, DEPLOYMENTS, EVENTS, JOBS, NETWORKPOLICIES, SABER, SaberAPIEmulator
from saber_emulator.profile import LatencyProfile
from saber_operator.builders import ENGINE_HASH_ANNOTATION
from saber_operator.handlers import run_operator
from saber_operator.settings import OperatorSettings
from saber_sidecar.config import parse_config

NS = "team-a"
TEST_CLIENT = {"X-Test-Client": "1"}
PROFILE = {
    "name": "measured-engine", "description": "saber calibrate on a test engine",
    "decode_batch_sizes": [1, 2, 4, 8, 16], "decode_step_s": [0.021, 0.022, 0.025, 0.031, 0.046],
    "prefill_s_per_token": 0.0014,
}


def cr(name: str, **spec: Any) -> dict[str, Any]:
    body = {
        "model": {"name": "coder"},
        "engine": {"kind": "emulator", "maxNumSeqs": 64},
        "sla": {"classes": [{"name": "interactive", "deadlineSeconds": 2.0}], "defaultClass": "interactive"},
        "calibration": {"enabled": True, "maxConcurrency": 16},
        **spec,
    }
    return {"apiVersion": "saber.dev/v1alpha1", "kind": "SaberService", "metadata": {"name": name, "namespace": NS}, "spec": body}


class API:
    """The test's own client of the emulated API."""

    def __init__(self, emu: SaberAPIEmulator, url: str, session: aiohttp.ClientSession) -> None:
        self.emu, self.url, self.session = emu, url, session

    def _path(self, resource: str, name: str | None = None, sub: str = "") -> str:
        group_version, plural = resource.rsplit("/", 1)
        base = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
        return f"{self.url}{base}/namespaces/{NS}/{plural}" + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    async def create(self, resource: str, body: dict[str, Any]) -> None:
        async with self.session.post(self._path(resource), json=body, headers=TEST_CLIENT) as rsp:
            assert rsp.status == 200, await rsp.text()

    async def patch(self, resource: str, name: str, patch: dict[str, Any], sub: str = "") -> None:
        headers = {**TEST_CLIENT, "Content-Type": "application/merge-patch+json"}
        async with self.session.patch(self._path(resource, name, sub), json=patch, headers=headers) as rsp:
            assert rsp.status == 200, await rsp.text()

    def all(self, resource: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(o.raw) for (res, ns, _), o in self.emu.objects.items()
                if res == kmock.resource(resource) and ns == NS and not o.deleted]

    def get(self, resource: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.all(resource) if o["metadata"]["name"] == name), None)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.all(EVENTS) if e["regarding"]["name"] == name]






@pytest.fixture
async def api():
    emu = SaberAPIEmulator()
    async with emu, kmock.Server(emu) as server, aiohttp.ClientSession() as session:
        yield API(emu, str(server.url).rstrip("/"), session)


@pytest.fixture
async def operator(api: API):
    """The operator in its own thread and event loop, as in its own process."""
    settings = OperatorSettings(api_server=api.url, timer_interval_seconds=0.3, retry_backoff_seconds=0.2,
                                scrape_timeout_seconds=0.2)
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=asyncio.run, args=(run_operator(settings, stop_flag=stop, ready_flag=ready),))
    thread.start()
    assert await asyncio.to_thread(ready.wait, 10), "the operator did not start"
    yield settings
    stop.set()
    await asyncio.to_thread(thread.join, 15)
    assert not thread.is_alive(), "the operator did not stop"


async def serving_pod(api: API, name: str, ip: str) -> None:
    """The Deployment controller's and kubelet's part: a ready pod of the current template."""
    template = api.get(DEPLOYMENTS, "svc")["spec"]["template"]
    await api.create("v1/pods", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": template["metadata"]["labels"],
                     "annotations": template["metadata"]["annotations"]},
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    })


async def finish_job(api: API, job: dict[str, Any], exit_code: int, message: str) -> None:
    """The Job controller's and kubelet's part: the calibration pod ran and exited."""
    labels = job["spec"]["template"]["metadata"]["labels"]
    await api.create("v1/pods", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": job["metadata"]["name"] + "-x1", "namespace": NS, "labels": labels},
        "status": {"phase": "Succeeded" if exit_code == 0 else "Failed", "containerStatuses": [{
            "name": "calibrate", "state": {"terminated": {"exitCode": exit_code, "message": message}}}]},
    })
    if exit_code == 0:
        status = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    else:
        status = {"failed": 2, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                               "message": "Job has reached the specified backoff limit"}]}
    await api.patch(JOBS, job["metadata"]["name"], {"status": status}, sub="status")



async def eventually(check, timeout: float = 15.0, what: str = "condition") -> Any:
    """operator_support's wait, with this file's longer default (a Job round trip takes a few ticks)."""
    return await _eventually(check, timeout, what)


def calibration(api: API) -> dict[str, Any]:
    return ((api.get(SABER, "svc") or {}).get("status") or {}).get("calibration") or {}


def sidecar_config(api: API):
    return parse_config(api.get(CONFIGMAPS, "svc-sidecar")["data"]["config.yaml"])


async def test_calibration_job_result_reaches_the_sidecar_config_and_reruns_on_engine_change(api: API, operator):
    await api.create(SABER, cr("svc"))
    dep = await eventually(lambda: api.get(DEPLOYMENTS, "svc"), what="deployment")
    uid = api.get(SABER, "svc")["metadata"]["uid"]
    engine_hash = dep["spec"]["template"]["metadata"]["annotations"][ENGINE_HASH_ANNOTATION]
    # The engine's seat limit is in the sidecar config from the start; no profile yet.
    assert sidecar_config(api).scheduling.engine_max_num_seqs == 64
    assert sidecar_config(api).scheduling.engine_profile is None
    # The NetworkPolicy is applied with the rest: the engine port only for calibration and scrapers.
    policy = api.get(NETWORKPOLICIES, "svc")
    assert policy["metadata"]["ownerReferences"][0]["uid"] == uid
    assert policy["spec"]["ingress"][1]["ports"] == [{"protocol": "TCP", "port": 8000}]

    # No ready pod yet: nothing to measure.
    await eventually(lambda: calibration(api).get("phase") == "Pending"
                     and condition(api.get(SABER, "svc"), "Calibrated").get("status") == "Unknown", what="Pending")
    assert api.all(JOBS) == []

    await serving_pod(api, "svc-a", "10.0.0.7")
    job = await eventually(lambda: (jobs := api.all(JOBS)) and jobs[0], what="calibration Job")
    assert job["metadata"]["ownerReferences"][0]["uid"] == uid
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:6] == ["--engine-url", "http://10.0.0.7:8000", "--model", "coder", "--out", "/dev/termination-log"]
    assert "--max-concurrency" in container["args"]
    assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    await eventually(lambda: calibration(api).get("phase") == "Running", what="Running")
    assert calibration(api)["job"] == job["metadata"]["name"] and calibration(api)["engineHash"] == engine_hash

    # The calibration pod exits 0 with the profile as its termination message.
    await finish_job(api, job, 0, yaml.safe_dump(PROFILE))
    await eventually(lambda: calibration(api).get("phase") == "Succeeded"
                     and condition(api.get(SABER, "svc"), "Calibrated").get("status") == "True", what="Succeeded")
    status = calibration(api)
    assert status["configMap"] == "svc-calibration" and status["profileEngineHash"] == engine_hash
    assert status["measuredAt"]
    stored = api.get(CONFIGMAPS, "svc-calibration")
    assert stored["metadata"]["ownerReferences"][0]["uid"] == uid
    assert stored["metadata"]["annotations"][ENGINE_HASH_ANNOTATION] == engine_hash
    assert LatencyProfile.model_validate(yaml.safe_load(stored["data"]["profile.yaml"])) == LatencyProfile(**PROFILE)
    # The sidecar's ConfigMap, which it hot-reloads, carries the profile; the pods are not rolled.
    config = await eventually(lambda: (c := sidecar_config(api)).scheduling.engine_profile and c, what="profile in config")
    assert config.scheduling.engine_profile == LatencyProfile(**PROFILE)
    assert api.get(DEPLOYMENTS, "svc")["spec"]["template"] == dep["spec"]["template"]
    await asyncio.sleep(1.0)  # more timer passes: no second Job for the same engine
    assert len(api.all(JOBS)) == 1

    # An engine change: a new hash, so a new run against a pod of the new spec, not the old pod.
    await api.patch(SABER, "svc", {"spec": {"engine": {"kind": "emulator", "maxNumSeqs": 128}}})
    new_hash = await eventually(
        lambda: (h := api.get(DEPLOYMENTS, "svc")["spec"]["template"]["metadata"]["annotations"][ENGINE_HASH_ANNOTATION])
        != engine_hash and h, what="rolled Deployment")
    await eventually(lambda: calibration(api).get("engineHash") == new_hash and calibration(api)["phase"] == "Pending",
                     what="Pending on the new engine")
    assert len(api.all(JOBS)) == 1  # svc-a runs the old engine spec: not measured
    assert sidecar_config(api).scheduling.engine_max_num_seqs == 128
    assert sidecar_config(api).scheduling.engine_profile == LatencyProfile(**PROFILE)  # the last good one meanwhile
    await serving_pod(api, "svc-b", "10.0.0.8")
    second = await eventually(
        lambda: next((j for j in api.all(JOBS) if j["metadata"]["name"] != job["metadata"]["name"]), None),
        what="second Job")
    assert "http://10.0.0.8:8000" in second["spec"]["template"]["spec"]["containers"][0]["args"]

    # It fails: the status and a Warning event say what happened and how to retry; the old profile stays.
    await finish_job(api, second, 1, "error: cannot reach http://10.0.0.8:8000/v1/completions: connection refused")
    cond = await eventually(lambda: calibration(api).get("phase") == "Failed"
                            and (c := condition(api.get(SABER, "svc"), "Calibrated")).get("status") == "False" and c,
                            what="Failed")
    assert cond["reason"] == "JobFailed"
    assert "connection refused" in cond["message"]
    assert f"kubectl -n {NS} delete job {second['metadata']['name']}" in cond["message"]
    assert calibration(api)["profileEngineHash"] == engine_hash
    await eventually(lambda: any(e["type"] == "Warning" and e["reason"] == "JobFailed" and "delete job" in e["note"]
                                 for e in api.events("svc")), what="Warning event")
    assert sidecar_config(api).scheduling.engine_profile == LatencyProfile(**PROFILE)
    assert api.get(CONFIGMAPS, "svc-calibration")["metadata"]["annotations"][ENGINE_HASH_ANNOTATION] == engine_hash


async def test_invalid_output_fails_with_a_fix_and_disabled_calibration_runs_nothing(api: API, operator):
    await api.create(SABER, cr("svc"))
    await eventually(lambda: api.get(DEPLOYMENTS, "svc"), what="deployment")
    await serving_pod(api, "svc-a", "10.0.0.7")
    job = await eventually(lambda: (jobs := api.all(JOBS)) and jobs[0], what="calibration Job")
    await finish_job(api, job, 0, "usage: saber [-h] {sidecar,operator,emulator} ...\n")
    cond = await eventually(lambda: calibration(api).get("phase") == "Failed"
                            and (c := condition(api.get(SABER, "svc"), "Calibrated")).get("status") == "False" and c,
                            what="Failed")
    assert cond["reason"] == "InvalidProfile" and "saber calibrate" in cond["message"]
    assert api.get(CONFIGMAPS, "svc-calibration") is None
    assert sidecar_config(api).scheduling.engine_profile is None  # nothing usable: the built-in prior stays

    # Calibration off: no condition, no status section, no new Job.
    await api.patch(SABER, "svc", {"spec": {"calibration": {"enabled": False}}})
    await eventually(lambda: not calibration(api) and not condition(api.get(SABER, "svc"), "Calibrated"),
                     what="calibration status removed")
    assert len(api.all(JOBS)) == 1
