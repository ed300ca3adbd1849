"""Generate the SaberService CustomResourceDefinition from the pydantic models.

`saber crd generate` writes it; `saber crd check` (and a unit test) fails when the checked-in
YAML and the models differ. The pydantic JSON schema is turned into a structural OpenAPI v3
schema (no $ref, no anyOf-with-null, no `title`), and the cross-field rules the pydantic
validators enforce are added as CEL `x-kubernetes-validations`, so `kubectl apply` rejects
what the operator would otherwise only report later as Degraded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from saber_operator.spec import (
    ENGINE_PORT,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    SaberServiceSpec,
    SaberServiceStatus,
    _inline_refs,
)

CRD_FILE = Path("crds") / f"{GROUP}_{PLURAL}.yaml"

# Bounds the CRD adds so the apiserver can cost CEL rules that iterate over lists.
MAX_SLA_CLASSES = 64

# (path of property names from spec, rule, message)
VALIDATIONS: list[tuple[tuple[str, ...], str, str]] = [
    (
        (),
        "(has(self.engine) && self.engine.kind == 'emulator') || has(self.model.source)",
        "engine.kind vllm needs model.source (pvc or hub)",
    ),
    (("model", "source"), "has(self.pvc) != has(self.hub)", "set exactly one of model.source.pvc or model.source.hub"),
    (("sla",), "self.classes.exists(c, c.name == self.defaultClass)", "sla.defaultClass must name one of sla.classes"),
    (("sla", "classes"), "self.all(c, self.exists_one(d, d.name == c.name))", "sla.classes names must be unique"),
    (("sidecar",), f"!has(self.port) || self.port != {ENGINE_PORT}", f"sidecar.port {ENGINE_PORT} is the engine's port"),
    (
        ("scheduling", "speedModel"),
        "!has(self.params) || size(self.params) == "
        "(self.form == 'usl' ? 3 : (self.form == 'logistic' ? 4 : 2))",
        "speedModel.params takes 3 values for usl, 4 for logistic, 2 for linear",
    ),
]

# Object-valued fields that get `default: {}` so the apiserver fills in their nested defaults.
OBJECT_DEFAULTS: list[tuple[str, ...]] = [("engine",), ("sidecar",), ("service",), ("scheduling",), ("calibration",)]


def structural(node: Any) -> Any:
    """pydantic JSON schema -> Kubernetes structural schema."""
    if isinstance(node, list):
        return [structural(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: structural(v) for k, v in node.items()}
    node.pop("title", None)
    if node.get("additionalProperties") is False:  # pruning drops unknown fields; false is not structural
        del node["additionalProperties"]
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        nullable = len(options) < len(node["anyOf"])
        if len(options) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            node = {**options[0], **rest}
            if nullable:
                node["nullable"] = True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "default" in node and node["default"] is None:
        del node["default"]
    for bound, exclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[exclusive] = node.pop(bound)
            node[bound] = True
    return node


def _at(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = schema
    for name in path:
        node = node["properties"][name]
        if node.get("type") == "array" and name != path[-1]:
            node = node["items"]
    return node


def spec_schema() -> dict[str, Any]:
    schema: dict[str, Any] = structural(_inline_refs(SaberServiceSpec.model_json_schema(by_alias=True)))
    _at(schema, ("sla", "classes"))["maxItems"] = MAX_SLA_CLASSES
    for path in OBJECT_DEFAULTS:
        _at(schema, path)["default"] = {}
    for path, rule, message in VALIDATIONS:
        _at(schema, path).setdefault("x-kubernetes-validations", []).append({"rule": rule, "message": message})
    return schema


def status_schema() -> dict[str, Any]:
    schema: dict[str, Any] = structural(_inline_refs(SaberServiceStatus.model_json_schema(by_alias=True)))
    return schema


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["saber"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
                        {"name": "Replicas", "type": "integer", "jsonPath": ".status.readyReplicas"},
                        {"name": "SLA", "type": "number", "jsonPath": ".status.slaAttainment",
                         "description": "Request-weighted SLA attainment (0..1)."},
                        {"name": "Policy", "type": "string", "jsonPath": ".status.policy"},
                        # -o wide: how far the sidecars have learned the engine, and the calibration.
                        {"name": "Model-Confidence", "type": "number", "priority": 1,
                         "jsonPath": ".status.engineModel.confidence",
                         "description": "Mean confidence of the sidecars' learned engine model (0..1)."},
                        {"name": "Calibration", "type": "string", "priority": 1, "jsonPath": ".status.calibration.phase"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A code LLM served by vLLM (or saber's emulator) behind saber's SLA-aware sidecar.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = "# Generated by `saber crd generate` from saber_operator.spec; do not edit by hand.\n"


def render_crd() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100, allow_unicode=True)


def openapi_schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema
