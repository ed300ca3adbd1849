"""Every CEL rule (`x-kubernetes-validations`) of the shipped CRD, evaluated with cel-python.

The API server runs these rules on `kubectl apply`; no API server can run here, so each rule is
compiled and evaluated as the API server would: on the object after the schema's defaults are
filled in, with `self` bound to the node the rule sits on. Each rule has an object that passes
and one that fails, and the failing one fails that rule alone; the operator's pydantic model
refuses the failing ones too, so the two layers agree. A rule added to the CRD without cases
here fails `test_every_rule_has_cases`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import celpy
import pytest
import yaml

from saber_operator.crd import CRD_FILE
from saber_operator.spec import parse_spec

SCHEMA = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def rules(node: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict[str, str]]]:
    """(path of the node, rule) for every rule in the schema; `[]` in a path: the items of a list."""
    found = [(path, r) for r in node.get("x-kubernetes-validations") or []]
    for key, sub in (node.get("properties") or {}).items():
        found += rules(sub, (*path, key))
    if isinstance(node.get("items"), dict):
        found += rules(node["items"], (*path, "[]"))
    if isinstance(node.get("additionalProperties"), dict):
        found += rules(node["additionalProperties"], (*path, "{}"))
    return found


RULES = rules(SCHEMA)


def defaulted(node: dict[str, Any], value: Any) -> Any:
    """The API server's structural defaulting: missing fields with a `default` get it."""
    if isinstance(value, dict):
        out = dict(value)
        for key, sub in (node.get("properties") or {}).items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = defaulted(sub, out[key])
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            for key in set(out) - set(node.get("properties") or {}):
                out[key] = defaulted(extra, out[key])
        return out
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [defaulted(node["items"], v) for v in value]
    return value


def nodes_at(obj: Any, path: tuple[str, ...]) -> list[Any]:
    """The values a rule at `path` is evaluated on (none when the field is absent)."""
    if not path:
        return [obj]
    head, rest = path[0], path[1:]
    if head == "[]":
        return [n for item in obj or [] for n in nodes_at(item, rest)] if isinstance(obj, list) else []
    if head == "{}":
        return [n for v in (obj or {}).values() for n in nodes_at(v, rest)] if isinstance(obj, dict) else []
    return nodes_at(obj[head], rest) if isinstance(obj, dict) and head in obj else []


_ENV = celpy.Environment()


def failed_rules(resource: dict[str, Any]) -> list[str]:
    """The messages of the rules this object breaks, evaluated as the API server would."""
    obj = defaulted(SCHEMA, resource)
    failed = []
    for path, rule in RULES:
        program = _ENV.program(_ENV.compile(rule["rule"]))
        for value in nodes_at(obj, path):
            result = program.evaluate({"self": celpy.json_to_cel(value)})
            assert isinstance(result, celpy.celtypes.BoolType), f"{rule['rule']} gave {result!r}, not a bool"
            if not result:
                failed.append(rule["message"])
    return failed


def base() -> dict[str, Any]:
    return {
        "apiVersion": "saber.dev/v1alpha1", "kind": "SaberService", "metadata": {"name": "svc", "namespace": "ns"},
        "spec": {
            "model": {"name": "coder", "source": {"hub": {"id": "Qwen/Qwen2.5-Coder-3B-Instruct"}}},
            "engine": {"kind": "vllm", "resources": {"limits": {"nvidia.com/gpu": 1}}},
            "sla": {"classes": [{"name": "fast", "deadlineSeconds": 1.0}, {"name": "slow", "deadlineSeconds": 9.0}],
                    "defaultClass": "fast"},
            "scheduling": {"policy": "saber", "speedModel": {"form": "usl", "params": [0.02, 0.001, 0.0001]}},
            "sidecar": {"port": 8080},
        },
    }


def change(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    obj = base()
    fn(obj["spec"])
    return obj


# message of the rule -> (an object that passes it, one that fails it)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "engine.kind vllm needs model.source (pvc or hub)": (
        change(lambda s: (s.update(engine={"kind": "emulator"}), s["model"].pop("source"))),
        change(lambda s: s["model"].pop("source")),
    ),
    "set exactly one of model.source.pvc or model.source.hub": (
        change(lambda s: s["model"].update(source={"pvc": {"claimName": "weights"}})),
        change(lambda s: s["model"]["source"].update(pvc={"claimName": "weights"})),
    ),
    "sla.defaultClass must name one of sla.classes": (
        change(lambda s: s["sla"].update(defaultClass="slow")),
        change(lambda s: s["sla"].update(defaultClass="batch")),
    ),
    "sla.classes names must be unique": (
        change(lambda s: s["sla"]["classes"].append({"name": "other", "deadlineSeconds": 3.0})),
        change(lambda s: s["sla"]["classes"].append({"name": "slow", "deadlineSeconds": 3.0})),
    ),
    "speedModel.params takes 3 values for usl, 4 for logistic, 2 for linear": (
        change(lambda s: s["scheduling"]["speedModel"].update(form="linear", params=[0.02, 0.001])),
        change(lambda s: s["scheduling"]["speedModel"].update(form="logistic", params=[0.02, 0.001, 0.0001])),
    ),
    "sidecar.port 8000 is the engine's port": (
        change(lambda s: s["sidecar"].pop("port")),
        change(lambda s: s["sidecar"].update(port=8000)),
    ),
}


def test_every_rule_has_cases():
    assert RULES, "no x-kubernetes-validations found in the CRD"
    messages = [r["message"] for _, r in RULES]
    assert sorted(messages) == sorted(CASES), "add a passing and a failing object for each new CEL rule"


def test_the_base_object_passes_every_rule():
    assert failed_rules(base()) == []
    parse_spec(base()["spec"])


@pytest.mark.parametrize("message", sorted(CASES))
def test_rule_passes_and_fails(message: str):
    passing, failing = CASES[message]
    assert failed_rules(passing) == []
    assert failed_rules(failing) == [message]
    parse_spec(passing["spec"])
    with pytest.raises(ValueError):
        parse_spec(failing["spec"])


def test_defaults_are_applied_before_the_rules():
    # No sidecar.port at all: the default (not 8000) is what the rule sees, as in the API server.
    obj = change(lambda s: s.pop("sidecar"))
    assert defaulted(SCHEMA, obj)["spec"]["sidecar"]["port"] != 8000
    assert failed_rules(obj) == []
