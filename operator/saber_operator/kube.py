"""All of the operator's Kubernetes API I/O, in one place (aiohttp, JSON over HTTP).

Credentials come from kopf's login (the same `ConnectionInfo` kopf itself uses), so there is
one source of truth for where the API is and how to authenticate. Writes are server-side apply
with field manager `saber-operator`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from saber_operator.builders import FIELD_MANAGER


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class NotFound(KubeError):
    pass


@dataclass(frozen=True)
class Connection:
    """Where the API is and how to authenticate (mirrors kopf.ConnectionInfo)."""

    server: str
    token: str | None = None
    scheme: str | None = None
    ca_path: str | None = None
    ca_data: bytes | None = None
    insecure: bool = False
    certificate_path: str | None = None
    certificate_data: bytes | None = None
    private_key_path: str | None = None
    private_key_data: bytes | None = None

    @classmethod
    def from_kopf(cls, info: Any) -> Connection:
        def as_bytes(v: Any) -> bytes | None:
            if v is None:
                return None
            return v.encode() if isinstance(v, str) else bytes(v)

        return cls(
            server=str(info.server).rstrip("/"),
            token=info.token,
            scheme=info.scheme,
            ca_path=str(info.ca_path) if info.ca_path else None,
            ca_data=as_bytes(info.ca_data),
            insecure=bool(info.insecure),
            certificate_path=str(info.certificate_path) if info.certificate_path else None,
            certificate_data=as_bytes(info.certificate_data),
            private_key_path=str(info.private_key_path) if info.private_key_path else None,
            private_key_data=as_bytes(info.private_key_data),
        )

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        if self.insecure:
            return False
        ctx = ssl.create_default_context()
        if self.ca_path:
            ctx.load_verify_locations(cafile=self.ca_path)
        elif self.ca_data:
            data = self.ca_data
            try:  # kubeconfig carries base64; in-cluster files are PEM already
                data = base64.b64decode(data, validate=True)
            except ValueError:
                pass
            ctx.load_verify_locations(cadata=data.decode())
        if self.certificate_data and self.private_key_data:
            # ssl only loads a client key from a file: write it to a private temporary directory
            # and remove it as soon as it is loaded, so no key stays on disk.
            with tempfile.TemporaryDirectory() as tmp:
                cert, key = os.path.join(tmp, "client.crt"), os.path.join(tmp, "client.key")
                for path, data in ((cert, self.certificate_data), (key, self.private_key_data)):
                    with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                        f.write(data)
                ctx.load_cert_chain(cert, key)
        elif self.certificate_path:
            ctx.load_cert_chain(self.certificate_path, self.private_key_path)
        return ctx


def resource_path(api_version: str, plural: str, namespace: str | None, name: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = base + (f"/namespaces/{quote(namespace)}" if namespace else "") + f"/{plural}"
    return path + (f"/{quote(name)}" if name else "")


PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "Event"): "events",
    ("apps/v1", "Deployment"): "deployments",
    ("batch/v1", "Job"): "jobs",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors",
    ("saber.dev/v1alpha1", "SaberService"): "saberservices",
}


def object_path(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    plural = PLURALS[(obj["apiVersion"], obj["kind"])]
    return resource_path(obj["apiVersion"], plural, meta.get("namespace"), meta["name"])


class KubeClient:
    """A small async client for the calls the operator makes, and nothing else."""

    def __init__(
        self,
        connection: Callable[[], Connection | None],
        *,
        timeout_seconds: float = 10.0,
        discovery_ttl_seconds: float = 300.0,
    ) -> None:
        self._connection = connection
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._session_for: Connection | None = None
        self._discovery: dict[str, tuple[float, bool]] = {}
        self._discovery_ttl = discovery_ttl_seconds

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get_session(self) -> tuple[aiohttp.ClientSession, Connection]:
        conn = self._connection()
        if conn is None:
            raise KubeError(0, "not logged in to the Kubernetes API yet")
        if self._session is None or self._session_for != conn:
            if self._session is not None:
                await self._session.close()
            headers = {}
            if conn.token:
                headers["Authorization"] = f"{conn.scheme or 'Bearer'} {conn.token}"
            self._session = aiohttp.ClientSession(
                headers=headers,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(ssl=conn.ssl_context(), limit=64),
            )
            self._session_for = conn
        return self._session, conn

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        session, conn = await self._get_session()
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else {}
        async with session.request(method, conn.server + path, data=data, headers=headers, params=params) as rsp:
            text = await rsp.text()
            if rsp.status == 404:
                raise NotFound(404, _message(text))
            if rsp.status >= 400:
                raise KubeError(rsp.status, _message(text))
            return json.loads(text) if text else {}

    async def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", resource_path(api_version, plural, namespace, name))
        except NotFound:
            return None

    async def list(
        self, api_version: str, plural: str, namespace: str | None, label_selector: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        params = {}
        if label_selector:
            params["labelSelector"] = ",".join(f"{k}={v}" for k, v in label_selector.items())
        result = await self.request("GET", resource_path(api_version, plural, namespace), params=params)
        items = result.get("items") or []
        if label_selector:  # belt and braces: not every API emulator filters by labels
            items = [
                i for i in items
                if all(((i.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in label_selector.items())
            ]
        return items

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply: the API server creates the object or updates the fields we own."""
        return await self.request(
            "PATCH",
            object_path(obj),
            body=obj,
            content_type="application/apply-patch+yaml",
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
        )

    async def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> bool:
        try:
            await self.request(
                "DELETE",
                resource_path(api_version, plural, namespace, name),
                body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
            )
            return True
        except NotFound:
            return False

    async def patch_status(self, api_version: str, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self.request(
            "PATCH",
            resource_path(api_version, plural, namespace, name) + "/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    async def post_event(
        self, involved: dict[str, Any], type_: str, reason: str, message: str, now: str
    ) -> None:
        meta = involved["metadata"]
        namespace = meta["namespace"]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            # A unique name rather than generateName: API emulators in tests need a concrete one.
            "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.request("POST", resource_path("v1", "events", namespace), body=event)

    async def has_api(self, group_version: str) -> bool:
        """Whether the cluster serves an API group/version (cached): e.g. for ServiceMonitor."""
        cached = self._discovery.get(group_version)
        now = time.monotonic()
        if cached and now - cached[0] < self._discovery_ttl:
            return cached[1]
        try:
            await self.request("GET", f"/apis/{group_version}")
            found = True
        except NotFound:
            found = False
        self._discovery[group_version] = (now, found)
        return found


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
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None

