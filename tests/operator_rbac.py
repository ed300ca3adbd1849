"""The RBAC we ship, as rules, and the API calls the operator made checked against them.

The rules come from `kubectl kustomize` of an install (`manifests/base`: cluster scope;
`manifests/overlays/namespaced`: a Role per watched namespace), i.e. what a user applies, and
are whatever the bindings of the operator's service account grant, so a rule anyone adds to
those files (a Job, a NetworkPolicy) is checked too. The calls come from the API emulator's
record (`saber_bench.perf.kubeapi.SaberAPIEmulator.calls`).
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from saber_bench.perf.kubeapi import Call

ROOT = Path(__file__).resolve().parents[1]
SERVICE_ACCOUNT = ("saber-system", "saber-operator")


@dataclass(frozen=True)
class Grant:
    """One (scope, group, resource[/subresource], verb) a binding gives; scope None: cluster-wide."""

    scope: str | None
    group: str
    resource: str
    verb: str


@functools.cache
def rendered(install: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / install)], check=True, capture_output=True, text=True)
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@functools.cache
def grants(install: str) -> frozenset[Grant]:
    """Everything the operator's service account may do in that install."""
    docs = rendered(install)
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
             for d in docs if d["kind"] in ("Role", "ClusterRole")}
    out: set[Grant] = set()
    for b in docs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s.get("kind") == "ServiceAccount" and (s.get("namespace"), s.get("name")) == SERVICE_ACCOUNT
                   for s in b.get("subjects") or []):
            continue
        scope = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
        ref = b["roleRef"]
        role = roles[(ref["kind"], scope if ref["kind"] == "Role" else None, ref["name"])]
        for rule in role.get("rules") or []:
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    for verb in rule.get("verbs") or []:
                        out.add(Grant(scope, group, resource, verb))
    return frozenset(out)


def needed(call: Call) -> set[tuple[str | None, str, str, str]]:
    resource = call.resource + (f"/{call.subresource}" if call.subresource else "")
    return {(call.namespace, call.group, resource, verb) for verb in call.rbac_verbs}


def is_granted(need: tuple[str | None, str, str, str], given: frozenset[Grant]) -> bool:
    namespace, group, resource, verb = need
    return any(
        g.group == group and g.resource == resource and g.verb == verb and g.scope in (None, namespace)
        for g in given
    )


def ungranted(calls: list[Call], install: str) -> list[tuple[str | None, str, str, str]]:
    """The calls that install's RBAC would refuse (403 in a real cluster)."""
    given = grants(install)
    return sorted({n for c in calls for n in needed(c) if not is_granted(n, given)}, key=str)


def unused(calls: list[Call], install: str) -> list[Grant]:
    """The grants no call needed."""
    needs = {n for c in calls for n in needed(c)}
    return sorted(
        (g for g in grants(install)
         if not any(g.group == grp and g.resource == res and g.verb == verb and g.scope in (None, ns)
                    for ns, grp, res, verb in needs)),
        key=str,
    )
