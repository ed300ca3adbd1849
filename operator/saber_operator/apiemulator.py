"""A Kubernetes API *emulator* for tests and the benchmark (not a real API server).

No kube-apiserver can be installed on the build machines, so the operator's integration tests
and `saber_operator.perf` run against kmock's `KubernetesEmulator` (an in-memory API over
HTTP on loopback). This subclass adds the few API-server behaviours the operator relies on
that kmock leaves out: server-side apply creating a missing object, `metadata.uid`,
`generation` (bumped on spec changes) and `resourceVersion`, and an outage switch that answers
503 to everything, to test that the operator retries and converges. It needs the `kmock`
test dependency; the operator itself never imports it.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import uuid
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import enums  # kmock's action enum; not re-exported under a stable name

SABER = "saber.dev/v1alpha1/saberservices"
DEPLOYMENTS = "apps/v1/deployments"
CONFIGMAPS = "v1/configmaps"
SERVICES = "v1/services"
PODS = "v1/pods"
EVENTS = "v1/events"
JOBS = "batch/v1/jobs"
NETWORKPOLICIES = "networking.k8s.io/v1/networkpolicies"
VERBS = ["get", "list", "watch", "create", "patch", "update", "delete"]


@attrs.define(kw_only=True)
class SaberAPIEmulator(kmock.KubernetesEmulator):
    outage: bool = False
    # Requests carrying all of these headers are served even during an outage (the test's own client).
    outage_unless: dict[str, str] = attrs.field(factory=dict)
    # kmock matches every request against its whole request history (quadratic over a long run);
    # keep only the recent ones so a benchmark measures the operator, not the emulator.
    keep_requests: int | None = 1000
    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        info = kmock.ResourceInfo
        self.resources[SABER] = info(
            kind="SaberService", singular="saberservice", namespaced=True, verbs=VERBS,
            shortnames=["saber"], subresources=["status", "scale"],
        )
        self.resources[DEPLOYMENTS] = info(kind="Deployment", namespaced=True, verbs=VERBS, subresources=["status"])
        self.resources[CONFIGMAPS] = info(kind="ConfigMap", namespaced=True, verbs=VERBS)
        self.resources[SERVICES] = info(kind="Service", namespaced=True, verbs=VERBS)
        self.resources[PODS] = info(kind="Pod", namespaced=True, verbs=VERBS)
        self.resources[EVENTS] = info(kind="Event", namespaced=True, verbs=VERBS)
        self.resources[JOBS] = info(kind="Job", namespaced=True, verbs=VERBS, subresources=["status"])
        self.resources[NETWORKPOLICIES] = info(kind="NetworkPolicy", namespaced=True, verbs=VERBS)
        # kopf waits for these two to be discoverable before it starts watching anything.
        self.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False, verbs=VERBS)
        self.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = info(
            kind="CustomResourceDefinition", namespaced=False, verbs=VERBS
        )

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if self.keep_requests is not None and len(self._requests) > 2 * self.keep_requests:
            del self._requests[: -self.keep_requests]
        exempt = bool(self.outage_unless) and all(
            request.headers.get(k) == v for k, v in self.outage_unless.items()
        )
        if self.outage and not exempt:
            return aiohttp.web.json_response(
                {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503,
                 "reason": "ServiceUnavailable", "message": "API emulator outage (injected by the test)"},
                status=503,
            )
        if request.resource is not None and isinstance(request.data, dict):
            await self._emulate_api_server(request)
        return await super()._handle(request)

    async def _emulate_api_server(self, request: kmock.Request) -> None:
        data: dict[str, Any] = request.data
        meta = data.setdefault("metadata", {})
        if request.action == enums.action.CREATE:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("generation", 1)
            meta.setdefault("creationTimestamp", _now())
            meta["resourceVersion"] = str(next(self._versions))
            return
        if request.action != enums.action.UPDATE or request.name is None:
            return
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            exists = key in self.objects and not self.objects[key].deleted
            is_apply = "apply-patch" in request.headers.get("Content-Type", "")
            if not exists and is_apply:  # server-side apply creates what is missing
                obj = copy.deepcopy(data)
                obj["metadata"].update(
                    uid=str(uuid.uuid4()), generation=1, creationTimestamp=_now(),
                    resourceVersion=str(next(self._versions)),
                )
                if key in self.objects:
                    self.objects[key].create(obj)
                else:
                    self.objects[key] = obj
                await self._buses[request.resource].put({"type": "ADDED", "object": self.objects[key].raw})
                return
            if not exists:
                return
            current = self.objects[key].raw
            if request.subresource is None and "spec" in data:
                merged = _merge(copy.deepcopy(current.get("spec") or {}), data["spec"])
                if merged != current.get("spec"):
                    meta["generation"] = int(current.get("metadata", {}).get("generation") or 1) + 1
            meta["resourceVersion"] = str(next(self._versions))


def _merge(base: Any, patch: Any) -> Any:
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    for k, v in patch.items():
        if v is None:
            base.pop(k, None)
        else:
            base[k] = _merge(base.get(k), v)
    return base


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
