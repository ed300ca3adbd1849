"""Shared by the operator's kmock tests: the emulated API, its test client, the operator in a thread.

The Kubernetes API here is kmock's *emulator* (`saber_bench.perf.kubeapi`), not a real API
server: nothing runs the Deployment controller or the garbage collector, and CEL rules are not
evaluated (tests/unit/operator/test_operator_cel.py evaluates them).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kmock

from operator_rbac import ungranted
from saber_bench.perf.kubeapi import EVENTS, NAMESPACED_PEERINGS, PEERINGS, SaberAPIEmulator
from saber_operator.handlers import run_operator
from saber_operator.settings import OperatorSettings

NS = "team-a"
TEST_CLIENT = {"X-Test-Client": "1"}


def cr(name: str, **spec: Any) -> dict[str, Any]:
    body = {
        "model": {"name": "coder"},
        "engine": {"kind": "emulator", "maxNumSeqs": 64},
        "sla": {
            "classes": [
                {"name": "interactive", "deadlineSeconds": 1.0, "targetAttainment": 0.9},
                {"name": "batch", "deadlineSeconds": 12.0},
            ],
            "defaultClass": "batch",
        },
        "scheduling": {"policy": "saber"},
    }
    body.update(spec)
    return {"apiVersion": "saber.dev/v1alpha1", "kind": "SaberService", "metadata": {"name": name, "namespace": NS}, "spec": body}


def _path(resource: str, namespace: str | None) -> str:
    group_version, plural = resource.rsplit("/", 1)
    base = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
    return f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"


class API:
    """The test's own client of the emulated API (exempt from injected outages, recorded as the test's)."""

    def __init__(self, emu: SaberAPIEmulator, url: str, session: aiohttp.ClientSession) -> None:
        self.emu, self.url, self.session = emu, url, session

    async def create(self, body: dict[str, Any], resource: str = "saber.dev/v1alpha1/saberservices",
                     namespace: str | None = NS) -> None:
        async with self.session.post(self.url + _path(resource, namespace), json=body, headers=TEST_CLIENT) as rsp:
            assert rsp.status == 200, await rsp.text()

    async def patch(self, resource: str, name: str, patch: dict[str, Any], sub: str = "") -> None:
        path = f"{_path(resource, NS)}/{name}" + (f"/{sub}" if sub else "")
        headers = {**TEST_CLIENT, "Content-Type": "application/merge-patch+json"}
        async with self.session.patch(self.url + path, json=patch, headers=headers) as rsp:
            assert rsp.status == 200, await rsp.text()

    async def delete(self, resource: str, name: str) -> None:
        async with self.session.delete(f"{self.url}{_path(resource, NS)}/{name}", headers=TEST_CLIENT) as rsp:
            assert rsp.status == 200, await rsp.text()

    def get(self, resource: str, name: str, namespace: str | None = NS) -> dict[str, Any] | None:
        key = (kmock.resource(resource), namespace, name)
        if key not in self.emu.objects or self.emu.objects[key].deleted:
            return None
        return copy.deepcopy(self.emu.objects[key].raw)

    def all(self, resource: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(o.raw) for (res, ns, _), o in self.emu.objects.items()
                if res == kmock.resource(resource) and ns == NS and not o.deleted]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [
            obj.raw for (res, ns, _), obj in self.emu.objects.items()
            if res == kmock.resource(EVENTS) and not obj.deleted and obj.raw["regarding"]["name"] == name
        ]


def condition(body: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for cond in ((body or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return cond
    return {}


async def eventually(check, timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def emulated_api(install: str = "manifests/base", **options: Any) -> AsyncIterator[API]:
    """The API emulator on loopback; afterwards, every call the operator made must be granted
    by the RBAC of that shipped install, as a real API server would demand."""
    emu = SaberAPIEmulator(outage_unless=TEST_CLIENT, **options)
    async with emu, kmock.Server(emu) as server, aiohttp.ClientSession() as session:
        api = API(emu, str(server.url).rstrip("/"), session)
        # The peering objects the installs ship, for operators started with peering on:
        # cluster scope (manifests/base) and per served namespace (manifests/overlays/namespaced).
        await api.create({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                          "metadata": {"name": "saber-operator"}}, PEERINGS, None)
        await api.create({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                          "metadata": {"name": "saber-operator", "namespace": NS}}, NAMESPACED_PEERINGS)
        yield api
    refused = ungranted(emu.operator_calls(), install)
    assert not refused, f"calls {install} does not grant (403 in a cluster): {refused}"


@contextlib.asynccontextmanager
async def running_operator(api: API, **overrides: Any) -> AsyncIterator[OperatorSettings]:
    """The operator in its own thread and event loop, as in its own process: kopf treats every
    task that appears in its loop as its own and stops them all when it exits."""
    settings = OperatorSettings(**{
        "api_server": api.url, "timer_interval_seconds": 0.5, "retry_backoff_seconds": 0.2,
        "scrape_timeout_seconds": 1.0, **overrides,
    })
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=asyncio.run, args=(run_operator(settings, stop_flag=stop, ready_flag=ready),))
    thread.start()
    try:
        assert await asyncio.to_thread(ready.wait, 10), "the operator did not start"
        yield settings
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 20)
        assert not thread.is_alive(), "the operator did not stop"
