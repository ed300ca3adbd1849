"""The operator (real kopf, real kubernetes_asyncio client, real HTTP) against kmock's Kubernetes
API *emulator* on loopback.

No kube-apiserver can run here, so `SaberAPIEmulator` (kmock's KubernetesEmulator plus
server-side-apply creation, uid/generation/resourceVersion, 422 for a failed JSON-patch test,
an outage switch and a call record) stands in for it. Nothing emulates the Deployment
controller or the garbage collector: where a test needs a Deployment to report ready pods it
writes that status itself, as the controller would. Every test also checks that each call the
operator made is granted by the shipped RBAC (`operator_support.emulated_api`).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import kmock
import pytest
import yaml

from operator_support import API, NS, TEST_CLIENT, condition, cr, emulated_api, eventually, running_operator
from saber_bench.perf.kubeapi import CONFIGMAPS, DEPLOYMENTS, NETWORKPOLICIES, SABER, SERVICES
from saber_emulator.engine import EngineConfig, OutputLengthConfig
from saber_emulator.server import EmulatorServer, EmulatorSettings
from saber_operator.builders import ENGINE_HASH_ANNOTATION
from saber_operator.spec import parse_spec
from saber_sidecar.config import parse_config
from saber_sidecar.server import SidecarServer
from saber_sidecar.settings import SidecarSettings

CHILDREN = ((DEPLOYMENTS, "svc"), (SERVICES, "svc"), (CONFIGMAPS, "svc-sidecar"), (NETWORKPOLICIES, "svc"))


@pytest.fixture
async def api():
    async with emulated_api() as api:
        yield api


@pytest.fixture
async def operator(api: API):
    async with running_operator(api) as settings:
        yield settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def sidecar_metrics():
    """A real sidecar in front of a real engine emulator on loopback, configured from the CR's own
    `sla`/`scheduling` (as the operator's ConfigMap would configure it), with traffic through it:
    interactive requests that cannot meet their 1 s deadline, and batch requests that can."""
    config = parse_spec(cr("svc")["spec"]).sidecar_config()
    engine = EmulatorServer(EmulatorSettings(
        host="127.0.0.1", port=0, model="coder", engine=EngineConfig(output_len=OutputLengthConfig(kind="max"))))
    await engine.start()
    sidecar = SidecarServer(SidecarSettings(host="127.0.0.1", port=0, engine_url=f"http://127.0.0.1:{engine.port}"),
                            config=config)
    await sidecar.start()

    async def one(session: aiohttp.ClientSession, sla_class: str, max_tokens: int) -> None:
        body = {"model": "coder", "prompt": "def add(a, b):", "max_tokens": max_tokens, "ignore_eos": True}
        async with session.post(f"{sidecar.url}/v1/completions", json=body,
                                headers={"x-saber-sla-class": sla_class}) as rsp:
            assert rsp.status == 200, await rsp.text()
            await rsp.read()

    async with aiohttp.ClientSession() as session:
        # ~200 tokens take about 2 s on the paper-calibrated engine: past the 1 s interactive deadline.
        await asyncio.gather(*(one(session, "interactive", 200) for _ in range(2)),
                             *(one(session, "batch", 10) for _ in range(2)))
    yield sidecar.port
    await sidecar.stop()
    await engine.stop()


async def test_create_builds_children_status_and_reads_sidecar_metrics(api: API, operator, sidecar_metrics: int):
    await api.create(cr("svc", sidecar={"port": sidecar_metrics}))
    svc = await eventually(lambda: api.get(SABER, "svc") if condition(api.get(SABER, "svc"), "Ready") else None,
                           what="status")
    uid = svc["metadata"]["uid"]

    cm, dep, service = api.get(CONFIGMAPS, "svc-sidecar"), api.get(DEPLOYMENTS, "svc"), api.get(SERVICES, "svc")
    for child in (cm, dep, service):
        assert child["metadata"]["ownerReferences"][0]["uid"] == uid
        assert child["metadata"]["ownerReferences"][0]["controller"] is True
    config = parse_config(cm["data"]["config.yaml"])
    assert [c.name for c in config.classes] == ["interactive", "batch"]
    assert config.get_class("interactive").target_attainment == 0.9
    engine, sidecar = dep["spec"]["template"]["spec"]["containers"]
    assert engine["command"] == ["saber", "emulator"] and "64" in engine["args"]
    assert sidecar["args"][:2] == ["--port", str(sidecar_metrics)]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert svc["status"]["observedGeneration"] == 1
    assert condition(svc, "Ready")["status"] == "False"
    assert condition(svc, "Progressing")["status"] == "True"
    assert condition(svc, "Degraded")["status"] == "False"
    assert condition(svc, "SLAMet")["reason"] == "NoData"
    assert svc["status"]["selector"] == "app.kubernetes.io/name=saber,app.kubernetes.io/instance=svc"
    assert "saber.dev/finalizer" in svc["metadata"]["finalizers"]
    assert all(k.startswith("saber.dev/") for k in svc["metadata"].get("annotations", {}))

    # The Deployment controller's part: a pod runs and the rollout completes.
    await api.session.post(
        f"{api.url}/api/v1/namespaces/{NS}/pods",
        headers=TEST_CLIENT,
        json={
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "svc-abc", "namespace": NS, "labels": dep["spec"]["template"]["metadata"]["labels"]},
            "status": {"phase": "Running", "podIP": "127.0.0.1"},
        },
    )
    await api.patch(DEPLOYMENTS, "svc", {"status": {
        "observedGeneration": dep["metadata"]["generation"], "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1,
    }}, sub="status")

    svc = await eventually(
        lambda: (b := api.get(SABER, "svc")) and condition(b, "SLAMet").get("status") == "False" and b, what="SLAMet"
    )
    assert condition(svc, "Ready")["status"] == "True"
    assert condition(svc, "Progressing")["status"] == "False"
    assert "interactive 0.000 < 0.900" in condition(svc, "SLAMet")["message"]
    classes = {c["name"]: c for c in svc["status"]["classes"]}
    assert classes["interactive"]["attainment"] == pytest.approx(0.0)
    assert classes["interactive"]["requests"] == pytest.approx(2)
    assert classes["batch"]["attainment"] == pytest.approx(1.0)
    assert classes["batch"]["requests"] == pytest.approx(2)
    assert svc["status"]["slaAttainment"] == pytest.approx(0.5)
    assert svc["status"]["goodputRequestsPerSecond"] > 0
    assert svc["status"]["readyReplicas"] == 1
    reasons = lambda: {(e["type"], e["reason"]) for e in api.events("svc")}  # noqa: E731
    await eventually(lambda: {("Normal", "AllReplicasReady"), ("Warning", "BelowTarget")} <= reasons(), what="events")


async def test_sla_change_reaches_configmap_without_rolling_pods(api: API, operator):
    await api.create(cr("svc"))
    await eventually(lambda: api.get(DEPLOYMENTS, "svc"), what="deployment")
    template = api.get(DEPLOYMENTS, "svc")["spec"]["template"]

    await api.patch(SABER, "svc", {"spec": {
        "sla": {"classes": [{"name": "interactive", "deadlineSeconds": 2.5}], "defaultClass": "interactive"},
        "scheduling": {"policy": "static", "staticMaxConcurrency": 8},
    }})
    cm = await eventually(
        lambda: (c := api.get(CONFIGMAPS, "svc-sidecar")) and "policy: static" in c["data"]["config.yaml"] and c, what="configmap"
    )
    config = parse_config(cm["data"]["config.yaml"])
    assert config.classes[0].deadline_seconds == 2.5 and config.scheduling.static_max_concurrency == 8
    svc = await eventually(lambda: (b := api.get(SABER, "svc"))["status"].get("observedGeneration") == 2 and b)
    assert svc["status"]["policy"] == "static"
    assert api.get(DEPLOYMENTS, "svc")["spec"]["template"] == template


async def test_engine_change_rolls_deployment(api: API, operator):
    await api.create(cr("svc"))
    before = await eventually(lambda: api.get(DEPLOYMENTS, "svc"), what="deployment")
    await api.patch(SABER, "svc", {"spec": {"engine": {"kind": "emulator", "maxNumSeqs": 128}, "replicas": 3}})
    after = await eventually(
        lambda: (d := api.get(DEPLOYMENTS, "svc")) and "128" in d["spec"]["template"]["spec"]["containers"][0]["args"] and d,
        what="new engine args",
    )
    annotation = lambda d: d["spec"]["template"]["metadata"]["annotations"][ENGINE_HASH_ANNOTATION]  # noqa: E731
    assert annotation(after) != annotation(before)
    assert after["spec"]["replicas"] == 3


async def test_hand_edited_children_are_put_back(api: API, operator):
    await api.create(cr("svc"))
    await eventually(lambda: api.get(SERVICES, "svc") and api.get(CONFIGMAPS, "svc-sidecar"), what="children")
    original = api.get(CONFIGMAPS, "svc-sidecar")["data"]
    await api.patch(CONFIGMAPS, "svc-sidecar", {"data": {"config.yaml": "classes: []\n"}})
    await api.patch(DEPLOYMENTS, "svc", {"spec": {"replicas": 7}})
    await api.delete(SERVICES, "svc")
    await eventually(lambda: api.get(SERVICES, "svc"), what="service recreated")
    await eventually(lambda: api.get(CONFIGMAPS, "svc-sidecar")["data"] == original, what="config restored")
    await eventually(lambda: api.get(DEPLOYMENTS, "svc")["spec"]["replicas"] == 1, what="replicas restored")


async def test_invalid_spec_is_degraded_and_applies_nothing(api: API, operator):
    # Schema-valid, but vLLM with tensor parallelism 2 on one GPU cannot start.
    body = cr("bad", engine={
        "kind": "vllm", "tensorParallelSize": 2, "resources": {"limits": {"nvidia.com/gpu": 1}},
    }, model={"name": "coder", "source": {"hub": {"id": "Qwen/Qwen2.5-Coder-3B-Instruct"}}})
    await api.create(body)
    svc = await eventually(
        lambda: (b := api.get(SABER, "bad")) and condition(b, "Degraded").get("status") == "True" and b, what="Degraded"
    )
    cond = condition(svc, "Degraded")
    assert cond["reason"] == "InvalidSpec"
    assert "tensorParallelSize 2 needs as many GPUs" in cond["message"]
    assert cond["observedGeneration"] == 1
    await asyncio.sleep(1.0)  # a couple of timer runs: still nothing applied
    assert api.get(DEPLOYMENTS, "bad") is None and api.get(CONFIGMAPS, "bad-sidecar") is None
    assert api.get(SERVICES, "bad") is None
    assert ("Warning", "InvalidSpec") in {(e["type"], e["reason"]) for e in api.events("bad")}

    # Fixing the spec clears it.
    await api.patch(SABER, "bad", {"spec": {"engine": {"resources": {"limits": {"nvidia.com/gpu": 2}}}}})
    await eventually(lambda: condition(api.get(SABER, "bad"), "Degraded").get("status") == "False", what="recovery")
    assert api.get(DEPLOYMENTS, "bad")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "nvidia.com/gpu": "2", "memory": "32Gi"  # the engine's default memory limit (builders.DEFAULT_ENGINE_MEMORY)
    }


def gone(api: API, *extra: tuple[str, str]) -> bool:
    return all(api.get(r, n) is None for r, n in (*CHILDREN, (SABER, "svc"), *extra))


async def created(api: API) -> dict[str, Any]:
    await api.create(cr("svc"))
    await eventually(lambda: all(api.get(r, n) for r, n in CHILDREN), what="children")
    return await eventually(lambda: (b := api.get(SABER, "svc")) and "saber.dev/finalizer" in
                            (b["metadata"].get("finalizers") or []) and b, what="finalizer")


async def test_delete_removes_children(api: API, operator):
    await created(api)
    await api.delete(SABER, "svc")
    await eventually(lambda: gone(api), what="children deleted and finalizer released")
    deletes = {(c.resource, c.name) for c in api.emu.operator_calls() if c.verb == "delete" and c.status == 200}
    assert deletes == {("deployments", "svc"), ("services", "svc"), ("configmaps", "svc-sidecar"),
                       ("networkpolicies", "svc")}


async def test_delete_completes_when_a_write_races_the_finalizer_release(api: API, operator):
    """The stuck deletions of issue 12, made to happen every time: kopf removes its finalizer with
    a JSON patch that first tests the resourceVersion it last saw. Another write in between (our
    own status write, another controller) fails that test. A real API server answers 422 and kopf
    retries on the next event; kmock answered 500, kopf retried the same stale patch for ~54 s,
    gave up and waited for an event that never came. Here a write lands right before it."""
    await created(api)
    raced: list[int] = []

    async def race(request: kmock.Request) -> None:
        ops = request.data if isinstance(request.data, list) else []
        if request.resource == kmock.resource(SABER) and any(
                op.get("path", "").startswith("/metadata/finalizers") for op in ops):
            raced.append(1)
            if len(raced) == 1:
                await api.patch(SABER, "svc", {"metadata": {"labels": {"raced": "yes"}}})

    api.emu.before_request = race
    await api.delete(SABER, "svc")
    await eventually(lambda: gone(api), timeout=15, what="finalizer released despite the race")
    assert len(raced) >= 2, "kopf's first finalizer patch lost the race and was retried"
    refused = [c for c in api.emu.operator_calls() if c.resource == "saberservices" and c.status == 422]
    assert refused, "the stale JSON patch was answered 422"


async def test_delete_completes_while_a_timer_tick_is_under_way(api: API, operator):
    """The stuck deletions of issue 12 as they happened in CI: the drift timer's tick was under
    way when deletion started. kopf keeps the finalizer until the timer exits and, for a timer
    still running, looked again only after 60 s (`settings.background.cancellation_polling`);
    nothing else wrote to the object meanwhile. Here one tick is held for 1.5 s."""
    await created(api)
    held = asyncio.Event()

    async def slow_tick(request: kmock.Request) -> None:
        # The tick's reconcile reads the ConfigMap first; hold that one read.
        if request.action.name == "FETCH" and request.resource == kmock.resource(CONFIGMAPS) and not held.is_set():
            held.set()
            await asyncio.sleep(1.5)

    api.emu.before_request = slow_tick
    await eventually(held.is_set, what="a timer tick under way")
    await api.delete(SABER, "svc")
    await eventually(lambda: gone(api), timeout=10, what="finalizer released after the tick")


async def test_delete_completes_when_children_are_already_gone(api: API):
    async with running_operator(api, timer_interval_seconds=60):  # no drift correction meanwhile
        await created(api)
        for resource, name in CHILDREN:
            await api.delete(resource, name)
        await api.delete(SABER, "svc")
        await eventually(lambda: gone(api), what="finalizer released with no children left")
    assert not [c for c in api.emu.operator_calls() if c.verb == "delete" and c.status == 200]


async def test_delete_completes_after_api_errors(api: API, operator):
    await created(api)
    api.emu.outage = True  # every operator call answered 503 for a while
    await api.delete(SABER, "svc")
    await asyncio.sleep(1.5)
    assert api.get(SABER, "svc")["metadata"]["deletionTimestamp"]
    assert all(api.get(r, n) for r, n in CHILDREN), "nothing can be deleted during the outage"
    api.emu.outage = False
    await eventually(lambda: gone(api), timeout=20, what="deletion after the outage")


async def test_delete_completes_when_the_operator_restarts_mid_deletion(api: API):
    async with running_operator(api):
        await created(api)

        async def fail_after_first_child(request: kmock.Request) -> None:
            # The ConfigMap is deleted first; from then on the API fails: deletion half done.
            if request.action.name == "DELETE" and request.resource == kmock.resource(CONFIGMAPS):
                api.emu.outage = True

        api.emu.before_request = fail_after_first_child
        await api.delete(SABER, "svc")
        await eventually(lambda: api.get(CONFIGMAPS, "svc-sidecar") is None, what="first child deleted")
        await asyncio.sleep(0.5)  # the cleanup retries against the outage
    assert api.get(DEPLOYMENTS, "svc") and api.get(SERVICES, "svc"), "stopped mid-deletion"
    assert "saber.dev/finalizer" in api.get(SABER, "svc")["metadata"]["finalizers"]
    api.emu.before_request, api.emu.outage = None, False
    async with running_operator(api):
        await eventually(lambda: gone(api), timeout=20, what="deletion finished by the restarted operator")


async def test_api_outage_then_converges(api: API, operator):
    api.emu.outage = True
    await api.create(cr("svc"))
    await asyncio.sleep(1.5)
    assert api.get(DEPLOYMENTS, "svc") is None
    api.emu.outage = False
    await eventually(
        lambda: (b := api.get(SABER, "svc")) and (b.get("status") or {}).get("observedGeneration") == 1,
        timeout=20, what="convergence after the outage",
    )
    assert api.get(DEPLOYMENTS, "svc") and api.get(SERVICES, "svc") and api.get(CONFIGMAPS, "svc-sidecar")
    assert yaml.safe_load(api.get(CONFIGMAPS, "svc-sidecar")["data"]["config.yaml"])["default_class"] == "batch"
