"""The Service CRD, generated from the pydantic models in `kubeforge/api.py`.

pydantic writes JSON Schema; Kubernetes wants a *structural* schema. The rewrite here inlines
`$ref`s, turns `anyOf[X, null]` into X (nullable), `const` into a one-value enum, drops `title`
and `additionalProperties: false` (pruning and strict field validation do that job), marks
free-form values with `x-kubernetes-preserve-unknown-fields`, and keeps server-side defaults
only where users should see them. `make crds` writes the result to crds/; a unit test proves
the checked-in file equals it.
"""

from __future__ import annotations

from typing import Any

import yaml

from kubeforge.api import ServiceSpec, ServiceStatus
from kubeforge.contract import CATEGORY, CRD_NAME, GROUP, KIND, PLURAL, SHORT_NAME, VERSION

# Root rules: the name becomes `<name>-replica-<i>` pods and a `<name>-router` Service.
_ROOT_RULES = [
    {
        "rule": "self.metadata.name.size() <= 50",
        "message": "metadata.name must be at most 50 characters: pods are named "
        "<name>-replica-<index>",
    },
    {
        "rule": "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
        "message": "metadata.name must be a DNS-1035 label (lower case, starting with a letter): "
        "it names the router Service",
    },
]

_DESCRIPTION = (
    "A kubeforge Service: N replicas of a Python actor behind a router with sticky sessions "
    "and broadcast."
)

PRINTER_COLUMNS = [
    {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Healthy", "type": "integer", "jsonPath": ".status.healthyReplicas"},
    {
        "name": "GPUs",
        "type": "integer",
        "jsonPath": ".spec.gpusPerReplica",
        "description": "nvidia.com/gpu per replica",
    },
    {"name": "Req/s", "type": "number", "jsonPath": ".status.metrics.requestRate"},
    {"name": "Sessions", "type": "integer", "jsonPath": ".status.metrics.activeSessions"},
    {"name": "Procs", "type": "integer", "jsonPath": ".spec.procs", "priority": 1},
    {"name": "Hosts", "type": "integer", "jsonPath": ".spec.hosts", "priority": 1},
    {
        "name": "Status",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
        "priority": 1,
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    node = dict(node)
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        kinds = [a for a in any_of if a.get("type") != "null"]
        if len(kinds) != 1:
            raise ValueError(f"cannot express anyOf {any_of} structurally")
        nullable = len(kinds) < len(any_of)
        node = {**kinds[0], **node}
        if nullable:
            node["nullable"] = True
        return _structural(node, defs)  # the one kind may itself be a $ref
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, edge in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node[bound], bool):
            node[edge] = node.pop(bound)  # OpenAPI v3: the number, and a flag that excludes it
            node[bound] = True
    node.pop("title", None)
    if node.get("default", ...) in (None, [], {}):
        node.pop("default")  # default only what a user should see in the stored object
    if node.get("additionalProperties") is False:
        node.pop("additionalProperties")
    elif node.get("additionalProperties") is True:
        node.pop("additionalProperties")
        node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("type") == "array" and node.get("items") == {}:
        node["items"] = {"x-kubernetes-preserve-unknown-fields": True}
    if (
        node.get("type") == "object"
        and "properties" not in node
        and "additionalProperties" not in node
    ):
        node["x-kubernetes-preserve-unknown-fields"] = True
    return {k: _structural(v, defs) for k, v in node.items()}


def schema_of(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")  # type: ignore[attr-defined]
    defs = raw.pop("$defs", {})
    return _structural(raw, defs)


def crd() -> dict[str, Any]:
    spec = schema_of(ServiceSpec)
    status = schema_of(ServiceStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/part-of": "kubeforge"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT_NAME],
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": _DESCRIPTION,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                            "x-kubernetes-validations": _ROOT_RULES,
                        }
                    },
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated from kubeforge/api.py by `make crds` (kubeforge crd). Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)
