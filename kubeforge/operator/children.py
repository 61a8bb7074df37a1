"""The objects a Service owns besides its pods, and when one has drifted. Pure.

The operator applies a child (server-side apply) only when the fingerprint of what is live
differs from the fingerprint of what it wants, so an idle Service costs the API server nothing,
while a child edited or deleted by someone else is restored as soon as its watch event arrives.
A fingerprint covers the fields the operator owns, normalised as the API server stores them.
"""

from __future__ import annotations

import json
from typing import Any

from kubeforge.contract import A_ROUTER_HASH

# (apiVersion, kind) of every child kind the operator applies, in the order it applies them.
KINDS = [
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
]


def _ports(ports: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted(
        (p.get("name", ""), p.get("port"), str(p.get("targetPort", p.get("port"))))
        for p in ports or []
    )


def fingerprint(obj: dict[str, Any]) -> str:
    """What the operator owns of a child, as a comparable string (live or desired alike)."""
    kind = obj.get("kind")
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    owned: dict[str, Any] = {"kind": kind, "name": meta.get("name")}
    if kind == "Role":
        owned["rules"] = [
            {k: sorted(r.get(k) or []) for k in ("apiGroups", "resources", "verbs")}
            for r in obj.get("rules") or []
        ]
    elif kind == "RoleBinding":
        owned["roleRef"] = obj.get("roleRef")
        owned["subjects"] = obj.get("subjects")
    elif kind == "Service":
        owned["selector"] = spec.get("selector")
        owned["ports"] = _ports(spec.get("ports"))
        owned["type"] = spec.get("type", "ClusterIP")
    elif kind == "NetworkPolicy":
        owned["spec"] = {k: spec.get(k) for k in ("podSelector", "policyTypes", "ingress")}
    elif kind == "Deployment":
        owned["hash"] = (meta.get("annotations") or {}).get(A_ROUTER_HASH)
        owned["replicas"] = spec.get("replicas")
    return json.dumps(owned, sort_keys=True)


def unwanted(desired: list[dict[str, Any]], live: dict[tuple[str, str], str], kind: str) -> list:
    """Names of live children of `kind` that are no longer desired (a policy turned off)."""
    keep = {obj["metadata"]["name"] for obj in desired if obj["kind"] == kind}
    return sorted(name for k, name in live if k == kind and name not in keep)


def drifted(desired: list[dict[str, Any]], live: dict[tuple[str, str], str]) -> list[dict]:
    """The desired children that are missing or differ from what is live, keyed (kind, name)."""
    return [
        obj
        for obj in desired
        if live.get((obj["kind"], obj["metadata"]["name"])) != fingerprint(obj)
    ]
