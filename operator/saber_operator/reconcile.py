"""One level-based reconcile: desired children from the builders, drift corrected, status written.

Called on create, update and resume, and by the timer; it never looks at what happened
before, only at what is there now. Handlers (kopf) call in here; kube I/O goes through
`KubeClient`; object construction is in `builders`, status logic in `status`.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from saber_operator import builders
from saber_operator.calibration import CalibrationResult, reconcile_calibration
from saber_operator.kube import KubeClient, scrape
from saber_operator.settings import OperatorSettings
from saber_operator.spec import (
    GROUP,
    PLURAL,
    VERSION,
    CalibrationStatus,
    Condition,
    EngineModelStatus,
    SaberServiceSpec,
    SaberServiceStatus,
    parse_spec,
)
from saber_operator.status import (
    aggregate,
    deployment_conditions,
    engine_model_status,
    event_type,
    merge_conditions,
    parse_sidecar_metrics,
    sla_condition,
    status_dict,
    transitions,
)

log = logging.getLogger("saber.operator")

API_VERSION = f"{GROUP}/{VERSION}"
CHILD_KINDS = (
    ("v1", "configmaps"),
    ("apps/v1", "deployments"),
    ("v1", "services"),
    ("monitoring.coreos.com/v1", "servicemonitors"),
    ("networking.k8s.io/v1", "networkpolicies"),
)


class InvalidSpec(Exception):
    """The spec cannot be served; the message says what to fix."""


def utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Context:
    kube: KubeClient
    settings: OperatorSettings
    clock: Callable[[], str] = utcnow
    _http: aiohttp.ClientSession | None = field(default=None, init=False)

    def http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        await self.kube.close()


def contains(live: Any, desired: Any) -> bool:
    """Whether the live object already has every field we set (the API server adds defaults)."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and contains(live[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(contains(a, b) for a, b in zip(live, desired))
    if isinstance(desired, (int, float)) and isinstance(live, str) or isinstance(live, (int, float)) and isinstance(desired, str):
        return str(live) == str(desired)
    return bool(live == desired)


def _plural(obj: dict[str, Any]) -> str:
    from saber_operator.kube import PLURALS

    return PLURALS[(obj["apiVersion"], obj["kind"])]


async def apply_children(ctx: Context, children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Apply each child that is missing or has drifted; returns the live objects by kind."""
    live_by_kind: dict[str, dict[str, Any]] = {}
    for child in children:
        meta = child["metadata"]
        live = await ctx.kube.get(child["apiVersion"], _plural(child), meta["namespace"], meta["name"])
        if live is None or not contains(live, child):
            log.info("applying %s %s/%s (%s)", child["kind"], meta["namespace"], meta["name"],
                     "create" if live is None else "drift")
            live = await ctx.kube.apply(child)
        live_by_kind[child["kind"]] = live
    return live_by_kind


async def sidecar_metrics(ctx: Context, owner: builders.Owner, spec: SaberServiceSpec) -> list[str]:
    pods = await ctx.kube.list("v1", "pods", owner.namespace, builders.selector_labels(owner))
    urls = [
        f"http://{pod['status']['podIP']}:{spec.sidecar.port}/metrics"
        for pod in pods
        if (pod.get("status") or {}).get("podIP") and (pod.get("status") or {}).get("phase") == "Running"
        and not (pod.get("metadata") or {}).get("deletionTimestamp")
    ]
    texts = await asyncio.gather(*(scrape(ctx.http(), url, ctx.settings.scrape_timeout_seconds) for url in urls))
    return [t for t in texts if t is not None]


async def write_status(
    ctx: Context, body: dict[str, Any], new: SaberServiceStatus, changed_only: bool = True
) -> None:
    meta = body["metadata"]
    old: dict[str, Any] = body.get("status") or {}
    new_dict = status_dict(new)
    if changed_only and all(old.get(k) == v for k, v in new_dict.items()) and set(old) <= set(new_dict):
        return
    patch: dict[str, Any] = {k: None for k in old if k not in new_dict}  # merge patch: null removes
    patch.update(new_dict)
    await ctx.kube.patch_status(API_VERSION, PLURAL, meta["namespace"], meta["name"], patch)
    if ctx.settings.events:
        for cond in transitions(old.get("conditions") or [], new.conditions):
            text = f"{cond.type}={cond.status}" + (f": {cond.message}" if cond.message else "")
            try:
                await ctx.kube.post_event(body, event_type(cond), cond.reason, text, ctx.clock())
            except Exception as exc:  # an event is a courtesy; never fail the reconcile for it
                log.warning("could not post event for %s/%s: %s", meta["namespace"], meta["name"], exc)


async def report_invalid(ctx: Context, body: dict[str, Any], message: str) -> None:
    old = body.get("status") or {}
    generation = body["metadata"].get("generation")
    conditions = [Condition.model_validate(c) for c in old.get("conditions") or [] if c.get("type") != "Degraded"]
    conditions.append(
        Condition(
            type="Degraded", status="True", reason="InvalidSpec",
            message=f"spec not applied, fix it: {message}", observed_generation=generation,
        )
    )
    try:
        status = SaberServiceStatus.model_validate({**old, "observedGeneration": generation, "conditions": []})
    except ValueError:  # a status written by someone else: start afresh rather than fail to report
        status = SaberServiceStatus(observed_generation=generation)
    status.conditions = merge_conditions(old.get("conditions") or [], conditions, ctx.clock())
    await write_status(ctx, body, status)


async def reconcile(ctx: Context, body: dict[str, Any], scrape_metrics: bool = True) -> SaberServiceStatus:
    """Bring the children in line with the spec and write the status. Raises InvalidSpec."""
    owner = builders.Owner.from_body(body)
    try:
        spec = parse_spec(body.get("spec") or {})
    except ValueError as exc:
        await report_invalid(ctx, body, str(exc))
        raise InvalidSpec(str(exc)) from None

    servicemonitor = ctx.settings.servicemonitor and await ctx.kube.has_api("monitoring.coreos.com/v1")
    engine_hash = builders.deployment_engine_hash(builders.build_deployment(owner, spec, ctx.settings.saber_image))
    # Before the children: a profile stored now reaches the sidecar config in this same pass.
    calibration = await reconcile_calibration(
        ctx.kube, owner, spec, engine_hash, saber_image=ctx.settings.saber_image, now=ctx.clock(),
        generation=body["metadata"].get("generation"), old=(body.get("status") or {}).get("calibration"),
    )
    # Everything is built before anything is written: a spec that cannot be built applies nothing.
    children = builders.build_children(
        owner, spec, ctx.settings.saber_image, servicemonitor, engine_profile=calibration.profile,
        network_policy=ctx.settings.network_policy, engine_scrapers=ctx.settings.engine_metrics_from,
    )
    live = await apply_children(ctx, children)
    return await refresh_status(ctx, body, spec, live.get("Deployment"), scrape_metrics, calibration)


async def refresh_status(
    ctx: Context,
    body: dict[str, Any],
    spec: SaberServiceSpec,
    deployment: dict[str, Any] | None,
    scrape_metrics: bool = True,
    calibration: CalibrationResult | None = None,
) -> SaberServiceStatus:
    owner = builders.Owner.from_body(body)
    generation = body["metadata"].get("generation")
    old = body.get("status") or {}
    conditions, replicas, ready = deployment_conditions(spec.replicas, deployment, generation)
    config = spec.sidecar_config()
    texts = await sidecar_metrics(ctx, owner, spec) if scrape_metrics and replicas else []
    pods = [parse_sidecar_metrics(t) for t in texts]
    figures = aggregate(config, pods)
    conditions.append(sla_condition(figures, generation))
    if scrape_metrics:
        engine_model = engine_model_status(pods)
    else:  # a Deployment event: nothing scraped, keep what the last scrape learned
        engine_model = EngineModelStatus.model_validate(old["engineModel"]) if old.get("engineModel") else None
    if calibration is None and spec.calibration.enabled:  # not reconciled this time: keep it as it was
        calibration_status = CalibrationStatus.model_validate(old["calibration"]) if old.get("calibration") else None
        conditions += [Condition.model_validate(c) for c in old.get("conditions") or [] if c.get("type") == "Calibrated"]
    elif calibration is None:
        calibration_status = None
    else:
        calibration_status = calibration.status
        if calibration.condition is not None:
            conditions.append(calibration.condition)
    status = SaberServiceStatus(
        observed_generation=generation,
        replicas=replicas,
        ready_replicas=ready,
        selector=builders.selector_string(owner),
        policy=config.scheduling.policy,
        sla_attainment=figures.overall,
        goodput_requests_per_second=figures.goodput,
        admission_limit=figures.admission_limit,
        classes=figures.classes,
        engine_model=engine_model,
        calibration=calibration_status,
        conditions=merge_conditions(old.get("conditions") or [], conditions, ctx.clock()),
    )
    await write_status(ctx, body, status)
    return status


async def refresh_owner(ctx: Context, deployment: dict[str, Any]) -> None:
    """A child Deployment changed: refresh its SaberService's status without re-applying."""
    meta = deployment.get("metadata") or {}
    ref = next((r for r in meta.get("ownerReferences") or [] if r.get("apiVersion") == API_VERSION), None)
    if ref is None:
        return
    body = await ctx.kube.get(API_VERSION, PLURAL, meta.get("namespace"), ref["name"])
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return
    try:
        spec = parse_spec(body.get("spec") or {})
    except ValueError:
        return  # the owner's own reconcile reports it
    await refresh_status(ctx, body, spec, deployment, scrape_metrics=False)


async def delete_children(ctx: Context, body: dict[str, Any]) -> int:
    """Remove the children now (owner references would also let the garbage collector do it)."""
    owner = builders.Owner.from_body(body)
    names = {"configmaps": builders.config_name(owner)}
    deleted = 0
    for api_version, plural in CHILD_KINDS:
        if plural == "servicemonitors" and not await ctx.kube.has_api(api_version):
            continue
        name = names.get(plural, owner.name)
        live = await ctx.kube.get(api_version, plural, owner.namespace, name)
        if live is None:
            continue
        refs = (live.get("metadata") or {}).get("ownerReferences") or []
        if any(r.get("uid") == owner.uid for r in refs):  # never delete what is not ours
            deleted += await ctx.kube.delete(api_version, plural, owner.namespace, name)
    return deleted
