"""All of the operator's Kubernetes API I/O, in one place: a thin adapter over `kubernetes_asyncio`.

`kubernetes_asyncio` (the official client's async twin) does the parts that are easy to get
wrong alone: where the API is and how to authenticate (in-cluster service account or
kubeconfig, with exec plugins and OIDC), TLS, token refresh, URL building and content types.
This module keeps what the reconcile code calls (`get`, `list`, `apply`, `delete`,
`patch_status`, `post_event`, `has_api`) and hands back plain dicts: the raw JSON the API
server sent, not the client's typed models, so drift checks see every field the server keeps
(also fields newer than the client's models) and tests compare dicts.

Writes are server-side apply with field manager `saber-operator`; status through the status
subresource; events are `events.k8s.io/v1`.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.config.config_exception import ConfigException

from saber_operator.builders import FIELD_MANAGER

log = logging.getLogger("saber.operator")

APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
# events.k8s.io/v1 wants a `<domain>/<name>` controller name.
REPORTING_CONTROLLER = "saber.dev/saber-operator"


class KubeError(Exception):
    """An API call failed: `status` is the HTTP status (0 when no answer came back)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message


class NotFound(KubeError):
    pass


# The kinds with a typed API in the client: (apiVersion, plural) -> (API class, method suffix).
# Everything else (SaberServices, ServiceMonitors, ...) goes through CustomObjectsApi.
TYPED: dict[tuple[str, str], tuple[str, str]] = {
    ("v1", "configmaps"): ("CoreV1Api", "namespaced_config_map"),
    ("v1", "services"): ("CoreV1Api", "namespaced_service"),
    ("v1", "pods"): ("CoreV1Api", "namespaced_pod"),
    ("v1", "serviceaccounts"): ("CoreV1Api", "namespaced_service_account"),
    ("apps/v1", "deployments"): ("AppsV1Api", "namespaced_deployment"),
    ("batch/v1", "jobs"): ("BatchV1Api", "namespaced_job"),
    ("networking.k8s.io/v1", "networkpolicies"): ("NetworkingV1Api", "namespaced_network_policy"),
    ("policy/v1", "poddisruptionbudgets"): ("PolicyV1Api", "namespaced_pod_disruption_budget"),
    ("events.k8s.io/v1", "events"): ("EventsV1Api", "namespaced_event"),
}

PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("apps/v1", "Deployment"): "deployments",
    ("batch/v1", "Job"): "jobs",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("events.k8s.io/v1", "Event"): "events",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors",
    ("saber.dev/v1alpha1", "SaberService"): "saberservices",
}


def plural_of(obj: dict[str, Any]) -> str:
    return PLURALS[(obj["apiVersion"], obj["kind"])]


async def load_configuration(
    api_server: str | None = None,
    *,
    token_filename: str | None = None,
    cert_filename: str | None = None,
    kubeconfig: str | None = None,
) -> client.Configuration:
    """Where the API is and how to authenticate, in kopf's order: an explicit plain-HTTP URL
    (API emulators), the in-cluster service account, kubeconfig ($KUBECONFIG or ~/.kube/config).

    In a pod the client re-reads the projected service-account token (which the kubelet
    rotates) once a minute; for kubeconfig, `KubeClient` reloads it when the API answers 401
    (expired exec-plugin or OIDC tokens)."""
    cfg = client.Configuration()
    if api_server:
        cfg.host = api_server.rstrip("/")
        return cfg
    kwargs = {k: v for k, v in (("token_filename", token_filename), ("cert_filename", cert_filename)) if v}
    try:
        config.load_incluster_config(  # type: ignore[no-untyped-call]  # the client leaves it unannotated
            client_configuration=cfg, try_refresh_token=True, **kwargs)
        return cfg
    except ConfigException:
        pass
    await config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG") or None,
                                  client_configuration=cfg, persist_config=False)
    return cfg


class KubeClient:
    """The calls the operator makes, over `kubernetes_asyncio`, with plain dicts in and out."""

    def __init__(
        self,
        configure: Callable[[], Awaitable[client.Configuration]],
        *,
        timeout_seconds: float = 10.0,
        discovery_ttl_seconds: float = 300.0,
    ) -> None:
        self._configure = configure
        self._timeout = timeout_seconds
        self._api: client.ApiClient | None = None
        self._retired: list[client.ApiClient] = []  # replaced after a 401; closed with us
        self._lock = asyncio.Lock()
        self._discovery: dict[str, tuple[float, bool]] = {}
        self._discovery_ttl = discovery_ttl_seconds

    async def close(self) -> None:
        for api in [*self._retired, *([self._api] if self._api is not None else [])]:
            await api.close()
        self._retired.clear()
        self._api = None

    async def _client(self, renew: bool = False) -> client.ApiClient:
        async with self._lock:
            if renew and self._api is not None:
                # Other calls may still be using it: retire it rather than close it under them.
                self._retired.append(self._api)
                self._api = None
                while len(self._retired) > 2:  # calls on the oldest have long finished
                    await self._retired.pop(0).close()
            if self._api is None:
                try:
                    cfg = await self._configure()
                except (ConfigException, OSError) as exc:
                    raise KubeError(0, f"no Kubernetes API credentials: {exc}") from None
                self._api = client.ApiClient(cfg)
                self._api.user_agent = FIELD_MANAGER
            return self._api

    async def _call(self, make: Callable[[client.ApiClient], Awaitable[Any]]) -> dict[str, Any]:
        """Run one client call (raw response) and return its JSON; errors become KubeError."""
        for attempt in (1, 2):
            api = await self._client(renew=attempt == 2)
            try:
                rsp = await make(api)
                try:
                    status, text = rsp.status, await rsp.text()
                finally:
                    rsp.release()
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise KubeError(0, f"Kubernetes API unreachable: {exc!r}") from None
            if status == 401 and attempt == 1:  # an expired token: load the credentials afresh, once
                log.info("the Kubernetes API answered 401; reloading credentials")
                continue
            if status == 404:
                raise NotFound(404, _message(text))
            if status >= 400:
                raise KubeError(status, _message(text))
            return json.loads(text) if text else {}
        raise AssertionError("unreachable")

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Any API path, JSON in and out, through the client's generic `call_api` (the old
        client's method, kept for callers of it); the typed methods below are preferred."""

        def make(api: client.ApiClient) -> Awaitable[Any]:
            return cast(Awaitable[Any], api.call_api(  # a coroutine; the client leaves it unannotated
                path, method.upper(), query_params=list((params or {}).items()),
                header_params={"Content-Type": content_type, "Accept": "application/json"}, body=body,
                auth_settings=["BearerToken"], response_types_map={}, _preload_content=False,
                _request_timeout=self._timeout,
            ))

        return await self._call(make)

    def _method(
        self, api: client.ApiClient, verb: str, api_version: str, plural: str, *, status: bool = False
    ) -> tuple[Callable[..., Awaitable[Any]], tuple[str, ...]]:
        """The client's method for `verb` on a kind, and the leading arguments it takes."""
        typed = TYPED.get((api_version, plural))
        suffix = "_status" if status else ""
        if typed is not None:
            cls, name = typed
            return getattr(getattr(client, cls)(api), f"{verb}_{name}{suffix}"), ()
        group, version = api_version.split("/", 1)
        custom_verb = {"read": "get"}.get(verb, verb)
        return getattr(client.CustomObjectsApi(api), f"{custom_verb}_namespaced_custom_object{suffix}"), (
            group, version
        )

    def _kw(self, **kw: Any) -> dict[str, Any]:
        return {"_preload_content": False, "_request_timeout": self._timeout, **kw}

    def _args(self, api_version: str, plural: str, namespace: str, name: str | None, lead: tuple[str, ...]) -> tuple[str, ...]:
        if lead:  # CustomObjectsApi: (group, version, namespace, plural[, name])
            return (*lead, namespace, plural) + ((name,) if name is not None else ())
        return ((name,) if name is not None else ()) + (namespace,)

    async def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""

        def make(api: client.ApiClient) -> Awaitable[Any]:
            fn, lead = self._method(api, "read", api_version, plural)
            return fn(*self._args(api_version, plural, namespace or "", name, lead), **self._kw())

        try:
            return await self._call(make)
        except NotFound:
            return None

    async def list(
        self, api_version: str, plural: str, namespace: str | None, label_selector: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in (label_selector or {}).items()) or None

        def make(api: client.ApiClient) -> Awaitable[Any]:
            fn, lead = self._method(api, "list", api_version, plural)
            kw = self._kw(label_selector=selector) if selector else self._kw()
            return fn(*self._args(api_version, plural, namespace or "", None, lead), **kw)

        items = (await self._call(make)).get("items") or []
        if label_selector:  # belt and braces: not every API emulator filters by labels
            items = [
                i for i in items
                if all(((i.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in label_selector.items())
            ]
        return items

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply: the API server creates the object or updates the fields we own."""
        meta = obj["metadata"]
        api_version, plural = obj["apiVersion"], plural_of(obj)

        def make(api: client.ApiClient) -> Awaitable[Any]:
            fn, lead = self._method(api, "patch", api_version, plural)
            args = self._args(api_version, plural, meta["namespace"], meta["name"], lead)
            return fn(*args, obj, **self._kw(field_manager=FIELD_MANAGER, force=True, _content_type=APPLY))

        return await self._call(make)

    async def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> bool:
        """Delete in the background (dependents go with the garbage collector); False when gone already."""
        options = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}

        def make(api: client.ApiClient) -> Awaitable[Any]:
            fn, lead = self._method(api, "delete", api_version, plural)
            return fn(*self._args(api_version, plural, namespace or "", name, lead), **self._kw(body=options))

        try:
            await self._call(make)
            return True
        except NotFound:
            return False

    async def patch_status(self, api_version: str, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the status subresource (a null value removes a field)."""

        def make(api: client.ApiClient) -> Awaitable[Any]:
            fn, lead = self._method(api, "patch", api_version, plural, status=True)
            args = self._args(api_version, plural, namespace, name, lead)
            return fn(*args, {"status": status}, **self._kw(_content_type=MERGE))

        await self._call(make)

    async def post_event(self, involved: dict[str, Any], type_: str, reason: str, message: str, now: str) -> None:
        """An events.k8s.io/v1 Event about `involved` (`now`: RFC 3339, UTC)."""
        meta = involved["metadata"]
        namespace = meta["namespace"]
        event: dict[str, Any] = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            # A unique name rather than generateName: API emulators in tests need a concrete one.
            "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": namespace},
            "eventTime": micro_time(now),
            "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": (os.environ.get("HOSTNAME") or socket.gethostname())[:128],
            "action": "Reconcile",
            "reason": reason[:128],
            "regarding": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "note": message[:1024],
            "type": type_,
        }

        def make(api: client.ApiClient) -> Awaitable[Any]:
            # the client serializes a plain dict body as it is; its annotation names only the model class
            return client.EventsV1Api(api).create_namespaced_event(namespace, event, **self._kw())  # type: ignore[arg-type]

        await self._call(make)

    async def has_api(self, group_version: str) -> bool:
        """Whether the cluster serves an API group/version (cached): e.g. for ServiceMonitor."""
        cached = self._discovery.get(group_version)
        now = time.monotonic()
        if cached and now - cached[0] < self._discovery_ttl:
            return cached[1]
        groups = (await self._call(lambda api: client.ApisApi(api).get_api_versions(**self._kw()))).get("groups")
        found = any(
            v.get("groupVersion") == group_version for g in groups or [] for v in g.get("versions") or []
        )
        self._discovery[group_version] = (now, found)
        return found


def micro_time(text: str) -> str:
    """An RFC 3339 time as the API's MicroTime (events.k8s.io wants the microseconds)."""
    t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _message(text: str) -> str:
    try:
        return str(json.loads(text).get("message") or text)[:500]
    except (ValueError, AttributeError):
        return text[:500]


async def scrape(session: aiohttp.ClientSession, url: str, timeout_seconds: float) -> str | None:
    """GET a sidecar's metrics page; None when the pod does not answer in time."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_seconds)) as rsp:
            if rsp.status != 200:
                return None
            return await rsp.text()
    except (TimeoutError, aiohttp.ClientError, OSError):
        return None
