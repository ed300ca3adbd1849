"""The RBAC we ship against the calls the operator really makes: every call granted, no grant unused.

The operator (kopf + kubernetes_asyncio, peering on, as the shipped Deployment runs it) goes
through a whole lifecycle against kmock's API *emulator*, which records each call (verb,
group, resource, subresource, namespace). The grants come from `kubectl kustomize` of the
install, read through the bindings of the operator's service account, so any rule added to
manifests/ is checked here too: a rule for a call no step below makes fails as unused (add the
step that makes it), a call no rule grants fails as a 403 would. Cluster scope is
`manifests/base`; the recommended install is `manifests/overlays/namespaced`.
"""

from __future__ import annotations

import asyncio

from operator_rbac import grants, ungranted, unused
from operator_support import API, NS, cr, emulated_api, eventually, running_operator
from saber_bench.perf.kubeapi import (
    CONFIGMAPS,
    DEPLOYMENTS,
    JOBS,
    NETWORKPOLICIES,
    PODS,
    SABER,
    SERVICEMONITORS,
    SERVICES,
)
from saber_operator.builders import FIELD_MANAGER

CHILDREN = ((DEPLOYMENTS, "svc"), (SERVICES, "svc"), (CONFIGMAPS, "svc-sidecar"), (SERVICEMONITORS, "svc"),
            (NETWORKPOLICIES, "svc"))
PROFILE = ("name: measured\ndecode_batch_sizes: [1, 8]\ndecode_step_s: [0.01, 0.02]\n"
           "prefill_s_per_token: 0.0001\n")


async def lifecycle(api: API) -> None:
    """Every kind of call the operator makes, once at least."""
    # Create: kopf adds its finalizer, the operator applies every child (the ServiceMonitor API
    # is served), writes the status and posts events.
    await api.create(cr("svc", calibration={"enabled": True}))
    await eventually(lambda: all(api.get(r, n) for r, n in CHILDREN), what="children")
    # The Deployment controller's part: a replica runs, so the operator reads its owner (on the
    # Deployment event) and lists pods to scrape, and to find one to calibrate.
    dep = api.get(DEPLOYMENTS, "svc")
    template = dep["spec"]["template"]["metadata"]
    await api.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "svc-abc", "namespace": NS, "labels": template["labels"], "annotations": template["annotations"]},
        "status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}},
        PODS)
    await api.patch(DEPLOYMENTS, "svc", {"status": {"observedGeneration": dep["metadata"]["generation"],
                                                    "replicas": 1, "readyReplicas": 1}}, sub="status")
    await eventually(lambda: any(c.resource == "pods" for c in api.emu.operator_calls()), what="pods listed")
    # Calibration: the operator applies a Job against the ready pod; the Job controller's and the
    # kubelet's part (its pod exits with the profile as termination message) is played here.
    job = await eventually(lambda: next((o for o in api.all(JOBS)), None), timeout=20, what="calibration job")
    await api.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": job["metadata"]["name"] + "-x1", "namespace": NS, "labels": job["spec"]["template"]["metadata"]["labels"]},
        "status": {"phase": "Succeeded", "containerStatuses": [{
            "name": "calibrate", "state": {"terminated": {"exitCode": 0, "message": PROFILE}}}]}}, PODS)
    await api.patch(JOBS, job["metadata"]["name"], {"status": {
        "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}, sub="status")
    await eventually(lambda: api.get(CONFIGMAPS, "svc-calibration"), timeout=20, what="calibration stored")
    # A failing API for a moment: kopf reports the failed handler as a (core v1) event.
    await api.patch(SABER, "svc", {"spec": {"replicas": 2}})
    api.emu.outage = True
    await asyncio.sleep(1.0)
    api.emu.outage = False
    await eventually(lambda: api.get(DEPLOYMENTS, "svc")["spec"]["replicas"] == 2, timeout=20, what="update applied")
    # Delete: the cleanup deletes every child, kopf releases its finalizer.
    await api.delete(SABER, "svc")
    await eventually(lambda: all(api.get(r, n) is None for r, n in (*CHILDREN, (SABER, "svc"))),
                     timeout=20, what="deletion")


def check(api: API, install: str) -> None:
    calls = api.emu.operator_calls()
    assert grants(install), f"no grants found for the operator's service account in {install}"
    assert not ungranted(calls, install), f"{install} does not grant these calls: {ungranted(calls, install)}"
    assert not unused(calls, install), f"{install} grants what the operator never does: {unused(calls, install)}"
    # Writes to children are server-side apply with our field manager, never anything else.
    writes = [c for c in calls if c.verb == "patch" and c.resource in ("deployments", "services", "configmaps",
                                                                       "servicemonitors") and not c.subresource]
    assert writes and all(c.content_type == "application/apply-patch+yaml" and c.field_manager == FIELD_MANAGER
                          for c in writes)


async def test_cluster_scope_rbac_grants_exactly_the_calls():
    async with emulated_api(servicemonitors=True) as api:
        async with running_operator(api, peering=True):
            await lifecycle(api)
        check(api, "manifests/base")


async def test_namespaced_install_grants_exactly_the_calls():
    async with emulated_api("manifests/overlays/namespaced", servicemonitors=True) as api:
        async with running_operator(api, peering=True, namespaces=[NS]):
            await lifecycle(api)
        check(api, "manifests/overlays/namespaced")
        # Nothing is asked of the whole cluster: peering too goes through the namespace's KopfPeering.
        cluster_wide = {(c.verb, c.group, c.resource) for c in api.emu.operator_calls() if c.namespace is None}
        assert not cluster_wide, cluster_wide
