"""A Kubernetes API *emulator* for the operator's tests and benchmark (not a real API server).

No kube-apiserver can be installed on the build machines, so the operator's integration tests
and `saber_bench.perf.operator` run against kmock's `KubernetesEmulator` (an in-memory API over
HTTP on loopback). This subclass adds the API-server behaviours the operator and kopf rely on
that kmock leaves out:

- server-side apply creating a missing object; `metadata.uid`, `generation` (bumped on spec
  changes) and a `resourceVersion` that changes on *every* write (JSON patches and the
  deletion mark included), assigned in the order the writes are applied;
- a JSON patch whose `test` operation fails is refused with 422, as the API server does.
  kmock answers 500 there; kopf removes its finalizer with such a patch (a `test` on the
  resourceVersion), retries a 500 with the same stale version for about a minute and then
  waits for an event that never comes: the stuck deletions of issue 12;
- lists carry a resourceVersion, and a watch from it replays only what changed since (kmock
  replays every object as ADDED: kopf saw stale copies after its own writes, retried them and
  got stuck on the 422 a stale write must get);
- an outage switch that answers 503 to everything (but the test's own client);
- a record of every call (verb, group, resource, subresource, namespace, HTTP status), which
  the tests compare with the shipped RBAC.

It needs the `kmock` package (the `bench` and `test` extras); no shipped component imports it.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import enums  # kmock's action enum; not re-exported under a stable name

SABER = "saber.dev/v1alpha1/saberservices"
DEPLOYMENTS = "apps/v1/deployments"
CONFIGMAPS = "v1/configmaps"
SERVICES = "v1/services"
PODS = "v1/pods"
EVENTS = "events.k8s.io/v1/events"
CORE_EVENTS = "v1/events"
JOBS = "batch/v1/jobs"
NETWORKPOLICIES = "networking.k8s.io/v1/networkpolicies"
SERVICEMONITORS = "monitoring.coreos.com/v1/servicemonitors"
PEERINGS = "kopf.dev/v1/clusterkopfpeerings"
NAMESPACED_PEERINGS = "kopf.dev/v1/kopfpeerings"
VERBS = ["get", "list", "watch", "create", "patch", "update", "delete"]

_ACTION_VERBS = {
    enums.action.LIST: "list",
    enums.action.WATCH: "watch",
    enums.action.FETCH: "get",
    enums.action.CREATE: "create",
    enums.action.UPDATE: "patch",
    enums.action.DELETE: "delete",
}
_WRITES = (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE)


@dataclass(frozen=True)
class Call:
    """One API request as RBAC sees it: `verb` on `group`/`resource`[/`subresource`]."""

    verb: str
    group: str
    resource: str
    subresource: str | None
    namespace: str | None
    name: str | None
    status: int
    test_client: bool  # made by the test itself (carries the `outage_unless` headers)
    content_type: str | None = None
    field_manager: str | None = None
    created: bool = False  # a server-side apply that created the object (RBAC: needs `create` too)

    @property
    def rbac_verbs(self) -> set[str]:
        """The verbs RBAC checks for this call: an apply that creates needs create and patch."""
        return {self.verb, "create"} if self.created else {self.verb}


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": code,
            "reason": reason, "message": message}


@attrs.define(kw_only=True)
class SaberAPIEmulator(kmock.KubernetesEmulator):
    outage: bool = False
    # Requests carrying all of these headers are the test's own: never failed, recorded as such.
    outage_unless: dict[str, str] = attrs.field(factory=dict)
    # Serve the prometheus-operator's ServiceMonitor API (discovery included).
    servicemonitors: bool = False
    # kmock matches every request against its whole request history (quadratic over a long run);
    # keep only the recent ones so a benchmark measures the operator, not the emulator.
    keep_requests: int | None = 1000
    # Called (and awaited) before each request but the test's own is served: tests inject a
    # concurrent write or a slow answer there.
    before_request: Callable[[kmock.Request], Awaitable[None]] | None = None
    calls: list[Call] = attrs.field(factory=list, init=False)
    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    _last_version: int = attrs.field(default=0, init=False)
    _write_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _created_by_apply: set[int] = attrs.field(factory=set, init=False)

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
        self.resources[CORE_EVENTS] = info(kind="Event", namespaced=True, verbs=VERBS)
        self.resources[JOBS] = info(kind="Job", namespaced=True, verbs=VERBS, subresources=["status"])
        self.resources[NETWORKPOLICIES] = info(kind="NetworkPolicy", namespaced=True, verbs=VERBS)
        self.resources[PEERINGS] = info(kind="ClusterKopfPeering", namespaced=False, verbs=VERBS)
        self.resources[NAMESPACED_PEERINGS] = info(kind="KopfPeering", namespaced=True, verbs=VERBS)
        if self.servicemonitors:
            self.resources[SERVICEMONITORS] = info(kind="ServiceMonitor", namespaced=True, verbs=VERBS)
        # The client's discovery asks for `/apis/` (with the slash), which kmock does not route.
        self.fallback["get /apis/"] << self._serve_apis
        # kopf waits for these two to be discoverable before it starts watching anything.
        self.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False, verbs=VERBS)
        self.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = info(
            kind="CustomResourceDefinition", namespaced=False, verbs=VERBS
        )

    def operator_calls(self) -> list[Call]:
        """The calls made by everyone but the test's own client (the operator's)."""
        return [c for c in self.calls if not c.test_client]

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if self.keep_requests is not None and len(self._requests) > 2 * self.keep_requests:
            del self._requests[: -self.keep_requests]
        exempt = bool(self.outage_unless) and all(
            request.headers.get(k) == v for k, v in self.outage_unless.items()
        )
        status = 500
        try:
            if self.outage and not exempt:
                status = 503
                return aiohttp.web.json_response(
                    status_body(503, "ServiceUnavailable", "API emulator outage (injected by the test)"), status=503
                )
            if self.before_request is not None and not exempt:
                await self.before_request(request)
            if request.resource is None or request.action not in _WRITES:
                response = await super()._handle(request)
            else:
                # Writes one at a time: each gets the next resourceVersion in the order applied.
                async with self._write_lock:
                    refused = await self._emulate_api_server(request)
                    response = refused or await super()._handle(request)
            status = response.status
            return response
        except kmock.KubernetesError as exc:
            status = exc.status
            raise
        finally:
            if request.resource is not None and request.resource.plural and request.action in _ACTION_VERBS:
                self.calls.append(Call(
                    verb=_ACTION_VERBS[request.action], group=request.resource.group or "",
                    resource=request.resource.plural, subresource=request.subresource,
                    namespace=request.namespace, name=request.name, status=status, test_client=exempt,
                    content_type=request.headers.get("Content-Type"), field_manager=request.params.get("fieldManager"),
                    created=_pop(self._created_by_apply, id(request)),
                ))

    def _next_version(self) -> str:
        self._last_version = next(self._versions)
        return str(self._last_version)

    async def _serve_list(self, request: kmock.Request) -> Any:
        async with self._write_lock:  # a version no write is half-way through
            payload = cast(dict[str, Any], await super()._serve_list(request))  # kmock's list answer is a dict
            payload["metadata"] = {"resourceVersion": str(self._last_version)}
        return payload

    async def _serve_watch(self, request: kmock.Request) -> Any:
        """kmock's watch, but from the requested resourceVersion: objects unchanged since are
        not replayed, and the bus is marked before the snapshot so no write falls in between."""
        yield b""
        since = _version(request.params.get("resourceVersion"))
        # kmock's own matching (name-mangled, private, so invisible to the type checker)
        check = self._KubernetesEmulator__check  # type: ignore[attr-defined]
        resource = request.resource
        assert resource is not None  # kmock routes a watch by its resource
        bus = self._buses[resource]
        async with self._lock:
            marker = await bus.mark()
            objs = [o for o in self._KubernetesEmulator__get_objs(request, strict=False)  # type: ignore[attr-defined]
                    if not o.deleted]
            replay = [o.raw for o in objs if _version(o.raw.get("metadata", {}).get("resourceVersion")) > since]
        sent: dict[tuple[Any, Any], int] = {}
        try:
            for raw in replay:
                meta = raw.get("metadata", {})
                sent[(meta.get("namespace"), meta.get("name"))] = _version(meta.get("resourceVersion"))
                yield {"type": "ADDED", "object": raw}
            async for event in bus.stream(since=marker):
                meta = event.get("object", {}).get("metadata", {})
                key = (meta.get("namespace"), meta.get("name"))
                if not check(request, resource, key[0], key[1], strict=False):
                    continue
                version = _version(meta.get("resourceVersion"))
                if event.get("type") != "DELETED" and version and version <= sent.get(key, 0):
                    continue  # already replayed in the snapshot
                yield event
        finally:
            await bus.unmark(marker)

    async def _emulate_api_server(self, request: kmock.Request) -> aiohttp.web.StreamResponse | None:
        """Adjust a write before kmock applies it; a response here refuses it instead."""
        # kmock types both as optional; the key is only looked up for a write to a named object,
        # which carries its resource and name
        key = cast("tuple[kmock.resource, str | None, str]", (request.resource, request.namespace, request.name))
        found = self.objects[key] if request.name is not None and key in self.objects else None
        stored = found if found is not None and not found.deleted else None  # the live object, if any

        if request.action == enums.action.DELETE:
            meta = stored.raw.get("metadata", {}) if stored is not None else {}
            if stored is not None and meta.get("finalizers") and not meta.get("deletionTimestamp"):
                stored.patch({"metadata": {"resourceVersion": self._next_version()}})
            return None

        if request.action == enums.action.UPDATE and isinstance(request.data, list):  # JSON patch
            if stored is None:
                return None  # kmock answers 404
            try:
                jsonpatch.apply_patch(copy.deepcopy(stored.raw), request.data)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                return aiohttp.web.json_response(status_body(422, "Invalid", f"the patch cannot be applied: {exc}"),
                                                 status=422)
            request.data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": self._next_version()})
            return None

        if not isinstance(request.data, dict):
            return None
        data: dict[str, Any] = request.data
        meta = data.setdefault("metadata", {})
        if request.action == enums.action.CREATE:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("generation", 1)
            meta.setdefault("creationTimestamp", _now())
            meta["resourceVersion"] = self._next_version()
            return None
        if request.name is None:
            return None
        is_apply = "apply-patch" in request.headers.get("Content-Type", "")
        if stored is None and is_apply:  # server-side apply creates what is missing
            obj = copy.deepcopy(data)
            obj["metadata"].update(uid=str(uuid.uuid4()), generation=1, creationTimestamp=_now(),
                                   resourceVersion=self._next_version())
            self._created_by_apply.add(id(request))
            async with self._lock:
                if key in self.objects:
                    self.objects[key].create(obj)
                else:
                    self.objects[key] = obj
                await self._buses[key[0]].put({"type": "ADDED", "object": self.objects[key].raw})
            return None
        if stored is None:
            return None  # kmock answers 404
        current = stored.raw
        if request.subresource is None and "spec" in data:
            merged = _merge(copy.deepcopy(current.get("spec") or {}), data["spec"])
            if merged != current.get("spec"):
                meta["generation"] = int(current.get("metadata", {}).get("generation") or 1) + 1
        meta["resourceVersion"] = self._next_version()
        return None


def _version(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _pop(items: set[int], item: int) -> bool:
    if item in items:
        items.discard(item)
        return True
    return False


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
