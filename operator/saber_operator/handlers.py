"""kopf wiring: login, settings, and the handlers that call `reconcile`.

The registry is built per operator instance (no module-level handlers), so tests and the
benchmark can run an operator in-process against an API emulator and stop it cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, TypedDict, cast

import kopf

from saber_operator.builders import FIELD_MANAGER
from saber_operator.kube import KubeClient, load_configuration
from saber_operator.reconcile import Context, InvalidSpec, delete_children, reconcile, refresh_owner
from saber_operator.settings import OperatorSettings
from saber_operator.spec import GROUP, PLURAL, VERSION


class _Resource(TypedDict):
    """The SaberService resource as kopf's decorators take it (typed, so `**resource` type-checks)."""

    group: str
    version: str
    plural: str


log = logging.getLogger("saber.operator")

DAEMON_EXIT_POLL_SECONDS = 1.0


class PerObject:
    """One reconcile or cleanup at a time per SaberService. kopf runs a timer tick beside the
    object's handlers: without this, a tick under way when deletion starts could re-apply a
    child the cleanup has just deleted."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, body: kopf.Body) -> asyncio.Lock:
        return self._locks.setdefault(str(body.get("metadata", {}).get("uid")), asyncio.Lock())

    def forget(self, body: kopf.Body) -> None:
        self._locks.pop(str(body.get("metadata", {}).get("uid")), None)


def configure(settings: kopf.OperatorSettings, op: OperatorSettings) -> None:
    """kopf's settings: our domain for its annotations and finalizer, peering, quiet events."""
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # kopf would post an event for every handler run; we post our own on condition transitions.
    settings.posting.level = logging.WARNING
    # The CRDs are installed with the operator; no need to watch CRDs and namespaces (or RBAC for it).
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    # Deletion waits for the object's timer to exit. When a tick is under way as deletion starts,
    # kopf re-checks only after `cancellation_polling` (60 s by default) or the object's next
    # event, and nothing else writes to an object being deleted: `kubectl delete` hung for a
    # minute or more (issue 12). Re-check every second instead (one small patch per check).
    settings.background.cancellation_polling = DAEMON_EXIT_POLL_SECONDS
    settings.networking.request_timeout = op.api_timeout_seconds * 3
    settings.peering.name = op.peering_name
    # kopf peers through the ClusterKopfPeering when it serves every namespace and through a
    # KopfPeering in each served namespace otherwise (kopf.operator() sets this from
    # `clusterwide`): manifests/base ships the first, manifests/overlays/namespaced the second.
    settings.peering.mandatory = op.peering
    settings.peering.standalone = not op.peering
    # Equal priorities make every peer pause; a random one elects the highest as the active replica.
    settings.peering.priority = op.priority if op.priority is not None else random.randint(1, 2**31 - 1)


def build_registry(op: OperatorSettings, ctx: Context) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    resource = _Resource(group=GROUP, version=VERSION, plural=PLURAL)
    backoff = op.retry_backoff_seconds
    serial = PerObject()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        if op.api_server:
            info: kopf.ConnectionInfo | None = kopf.ConnectionInfo(server=op.api_server, insecure=True)
        else:
            info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
        return info

    async def run(body: kopf.Body, **_: Any) -> None:
        async with serial.lock(body):
            if _deleting(body):
                return  # the cleanup handler's turn
            try:
                await reconcile(ctx, _plain(body))
            except InvalidSpec as exc:
                raise kopf.PermanentError(str(exc)) from None

    kopf.on.create(**resource, registry=registry, backoff=backoff, id="reconcile")(run)
    kopf.on.update(**resource, registry=registry, backoff=backoff, id="reconcile", field="spec")(run)
    kopf.on.resume(**resource, registry=registry, backoff=backoff, id="reconcile")(run)

    @kopf.timer(**resource, registry=registry, interval=op.timer_interval_seconds, initial_delay=op.timer_interval_seconds)
    async def drift(body: kopf.Body, **_: Any) -> None:
        # kopf stops timers when deletion starts, but a tick may already be under way: it must not
        # re-apply the children the cleanup deletes, nor write while kopf releases its finalizer.
        async with serial.lock(body):
            if _deleting(body):
                return
            try:
                await reconcile(ctx, _plain(body))
            except InvalidSpec:
                pass  # already reported as Degraded; the timer keeps checking

    @kopf.on.delete(**resource, registry=registry, backoff=backoff, id="cleanup")
    async def cleanup(body: kopf.Body, retry: int, **_: Any) -> None:
        # Idempotent: children already gone are skipped, so a retry after an API error and a
        # restarted operator (kopf calls this again for an object still being deleted) both finish.
        # On any error kopf keeps the finalizer and retries after the backoff.
        try:
            async with serial.lock(body):  # waits for a reconcile under way to finish first
                deleted = await delete_children(ctx, _plain(body))
        except Exception as exc:
            raise kopf.TemporaryError(f"deleting the children failed (try {retry + 1}), retrying: {exc}",
                                      delay=backoff) from exc
        serial.forget(body)
        log.info("deleted %d children of %s/%s", deleted, body.metadata.namespace, body.metadata.name)

    @kopf.on.event("apps", "v1", "deployments", registry=registry, labels={"app.kubernetes.io/managed-by": FIELD_MANAGER})
    async def child_changed(event: kopf.RawEvent, **_: Any) -> None:
        if event.get("type") in ("ADDED", "MODIFIED") and event.get("object"):
            try:
                # kopf's RawBody is a TypedDict view of the decoded JSON object, which is a plain dict
                await refresh_owner(ctx, cast(dict[str, Any], event["object"]))
            except Exception as exc:  # the timer corrects it; a watch handler must not fail loudly
                log.debug("status refresh after a Deployment event failed: %s", exc)

    return registry


def _deleting(body: kopf.Body) -> bool:
    return bool(body.get("metadata", {}).get("deletionTimestamp"))


def _plain(body: kopf.Body) -> dict[str, Any]:
    return {k: _thaw(v) for k, v in body.items()}


def _thaw(value: Any) -> Any:
    if hasattr(value, "items"):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


async def run_operator(
    op: OperatorSettings,
    *,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
) -> None:
    """Run until `stop_flag` is set (or forever)."""
    kube = KubeClient(lambda: load_configuration(op.api_server), timeout_seconds=op.api_timeout_seconds)
    ctx = Context(kube=kube, settings=op)
    registry = build_registry(op, ctx)
    settings = kopf.OperatorSettings()
    configure(settings, op)
    try:
        await kopf.operator(
            registry=registry,
            settings=settings,
            clusterwide=not op.namespaces,
            namespaces=op.namespaces,
            standalone=not op.peering,
            peering_name=op.peering_name if op.peering else None,
            priority=settings.peering.priority,
            liveness_endpoint=op.liveness_endpoint,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        await ctx.close()
