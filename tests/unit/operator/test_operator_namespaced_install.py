"""The namespaced install (manifests/overlays/namespaced): builds, validates, and hangs together.

Which calls its Role grants is checked against the operator's recorded calls in
tests/integration/operator/test_operator_rbac_calls.py; here, its shape: no cluster-wide
grants, and for every served namespace a Role, a RoleBinding, a KopfPeering and a
`--namespace` flag, and nothing served that has not all four.
"""

from __future__ import annotations

import subprocess

import kubernetes_validate
import yaml

K8S = "1.30"
OVERLAY = "manifests/overlays/namespaced"


def build() -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", OVERLAY], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_builds_and_validates_against_kubernetes():
    docs = build()
    for doc in docs:
        if doc["kind"] not in ("KopfPeering", "ClusterKopfPeering"):
            kubernetes_validate.validate(doc, K8S, strict=True)
    kinds = {d["kind"] for d in docs}
    assert {"Role", "RoleBinding", "KopfPeering", "Deployment", "ServiceAccount"} <= kinds
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}, "no cluster-wide grants"


def test_every_served_namespace_has_a_role_a_binding_a_peering_and_a_flag():
    docs = build()
    op = next(d for d in docs if d["kind"] == "Deployment")
    args = op["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--peering" in args
    flags = {a.split("=", 1)[1] for a in args if a.startswith("--namespace=")}
    by_kind = lambda kind: {d["metadata"]["namespace"] for d in docs if d["kind"] == kind}  # noqa: E731
    assert flags and flags == by_kind("Role") == by_kind("KopfPeering")
    for binding in (d for d in docs if d["kind"] == "RoleBinding"):
        assert binding["metadata"]["namespace"] in flags
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "saber-operator"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "saber-operator", "namespace": "saber-system"}]
    assert by_kind("RoleBinding") == flags
    assert any(d["kind"] == "CustomResourceDefinition" and d["metadata"]["name"] == "kopfpeerings.kopf.dev"
               and d["spec"]["scope"] == "Namespaced" for d in docs)
