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
    a missing grant, or a grant that names other resources (resourceNames). A refusal while the
    account's own Role or RoleBinding was deleted is its teardown and does not count: a router
    still running after the garbage collector took its Service's RBAC objects with the Service
    (the tier deletes Services and namespaces all the time), before its pod was stopped."""
    lines = [line for line in lines if line.strip()]
    bound = [line for line, gone in zip(lines, _unbound(lines), strict=True) if not gone]
    denied, allowed = used(bound, "forbid"), used(lines, "allow")
    return {
        user: left for user, done in denied.items() if (left := done - allowed.get(user, set()))
    }


def in_teardown(lines: Iterable[str]) -> dict[str, set[Permission]]:
    """Per user, what RBAC refused while the account's own Role or RoleBinding was deleted:
    what `refused` leaves out, for the audit to show."""
    lines = [line for line in lines if line.strip()]
    gone = [line for line, unbound in zip(lines, _unbound(lines), strict=True) if unbound]
    return used(gone, "forbid")


_ACCOUNT = re.compile(r"system:serviceaccount:([^:]+):([^:]+)")
_RBAC_OBJECTS = {"roles", "rolebindings"}


def _unbound(lines: list[str]) -> list[bool]:
    """Per line, in log order: whether its user is a service account whose Role or RoleBinding
    (named as the account, in its namespace: how the operator names a router's) was deleted,
    by name or with its namespace's whole collection, and not made again since."""
    gone: set[tuple[str, str]] = set()
    swept: set[str] = set()  # namespaces whose Roles went at once (a namespace's deletion)
    remade: set[tuple[str, str]] = set()  # made again in a swept namespace
    out = []
    for line in lines:
        event = json.loads(line)
        account = _ACCOUNT.fullmatch(event["user"]["username"])
        key = (account[1], account[2]) if account else None
        out.append(key is not None and (key in gone or (key[0] in swept and key not in remade)))
        ref, code = event.get("objectRef") or {}, event.get("responseStatus", {}).get("code", 0)
        if ref.get("resource") not in _RBAC_OBJECTS or not 200 <= code < 300:
            continue
        target, verb = (ref.get("namespace", ""), ref.get("name", "")), event["verb"]
        if verb == "delete":
            gone.add(target)
        elif verb == "deletecollection":
            swept.add(target[0])
            remade -= {k for k in remade if k[0] == target[0]}
        elif verb == "create" or (verb == "patch" and code == 201):
            gone.discard(target)
            remade.add(target)
    return out


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
