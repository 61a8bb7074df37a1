"""What service accounts did, read from the API server's audit log (JSON lines, Metadata
level), against what their RBAC rules grant. Pure: the e2e tier's audit test and the unit tests
feed it lines."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

Permission = tuple[str, str, str]  # (API group, resource or resource/subresource, verb)


def granted(rules: Iterable[dict[str, Any]]) -> set[Permission]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def refused(lines: Iterable[str]) -> dict[str, set[Permission]]:
    """Per user, what RBAC refused and never allowed. A refusal that a later request of the same
    kind overcame is a race (a pod that started before its RoleBinding); one that never was is
    a missing grant, or a grant that names other resources (resourceNames)."""
    lines = list(lines)
    denied, allowed = used(lines, "forbid"), used(lines, "allow")
    return {
        user: left for user, done in denied.items() if (left := done - allowed.get(user, set()))
    }


def used(lines: Iterable[str], decision: str | None = None) -> dict[str, set[Permission]]:
    """Per user, every request made on a resource, refused ones included, or those with the
    authorizer's `decision` ("allow", "forbid") alone. Discovery and other non-resource URLs
    need no rule and are left out."""
    out: dict[str, set[Permission]] = {}
    for line in lines:
        if not line.strip():
            continue
        event = json.loads(line)
        ref = event.get("objectRef")
        if not ref or "resource" not in ref:
            continue
        code = event.get("responseStatus", {}).get("code")
        # The authorizer's own verdict: a 403 from admission (a namespace being deleted) is not.
        verdict = event.get("annotations", {}).get("authorization.k8s.io/decision")
        if decision is not None and verdict != decision:
            continue
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        user = event["user"]["username"]
        done = out.setdefault(user, set())
        done.add((ref.get("apiGroup", ""), resource, event["verb"]))
        if event["verb"] == "patch" and code == 201:
            # A server-side apply that made the object: RBAC asked for `create` as well.
            done.add((ref.get("apiGroup", ""), resource, "create"))
    return out


def of_users(by_user: dict[str, set[Permission]], pattern: str) -> set[Permission]:
    """Everything the users whose names match `pattern` (a full match) did, together."""
    return {p for user, done in by_user.items() if re.fullmatch(pattern, user) for p in done}


def describe(permissions: set[Permission]) -> list[str]:
    return [f"{verb} {resource}.{group or 'core'}" for group, resource, verb in sorted(permissions)]
