"""The RBAC audit's reading of audit log lines (tests/e2e/rbac_audit.py)."""

from __future__ import annotations

import json

from tests.e2e.rbac_audit import describe, granted, in_teardown, of_users, refused, used


def line(
    user: str, verb: str, resource: str, group: str = "", sub: str = "", code: int = 200
) -> str:
    ref = {"resource": resource, "apiGroup": group, **({"subresource": sub} if sub else {})}
    if not group:
        del ref["apiGroup"]  # the core group has none in the log
    event = {"user": {"username": user}, "verb": verb, "objectRef": ref}
    verdict = {"authorization.k8s.io/decision": "forbid" if code == 403 else "allow"}
    return json.dumps({**event, "responseStatus": {"code": code}, "annotations": verdict})


def test_requests_are_grouped_by_user_with_subresources_and_discovery_left_out() -> None:
    lines = [
        line("system:serviceaccount:a:x-router", "watch", "pods"),
        line("system:serviceaccount:a:x-router", "patch", "services", "kubeforge.dev", "status"),
        line("system:serviceaccount:b:y-router", "list", "pods"),
        json.dumps({"user": {"username": "u"}, "verb": "get", "requestURI": "/apis"}),
        "",
    ]
    by_user = used(lines)
    assert set(by_user) == {"system:serviceaccount:a:x-router", "system:serviceaccount:b:y-router"}
    routers = of_users(by_user, r"system:serviceaccount:[^:]+:.+-router")
    assert routers == {
        ("", "pods", "watch"),
        ("", "pods", "list"),
        ("kubeforge.dev", "services/status", "patch"),
    }
    assert describe({("", "pods", "list")}) == ["list pods.core"]


def test_rules_expand_to_every_group_resource_and_verb() -> None:
    rules = [{"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create"]}]
    assert granted(rules) == {("", "events", "create"), ("events.k8s.io", "events", "create")}


def test_an_apply_that_creates_counts_as_create_too() -> None:
    op = "system:serviceaccount:kubeforge-system:kubeforge-operator"
    made = used([line(op, "patch", "deployments", "apps", code=201)])[op]
    assert made == {("apps", "deployments", "patch"), ("apps", "deployments", "create")}
    assert used([line(op, "patch", "deployments", "apps")])[op] == {
        ("apps", "deployments", "patch")
    }


def test_a_refusal_counts_only_when_nothing_of_its_kind_was_ever_allowed() -> None:
    router = "system:serviceaccount:a:x-router"
    lines = [
        line(router, "watch", "services", "kubeforge.dev", code=403),
        line(router, "list", "pods", code=403),  # before its RoleBinding existed
        line(router, "list", "pods"),
    ]
    assert refused(lines) == {router: {("kubeforge.dev", "services", "watch")}}
    assert len(used(lines)[router]) == 2
    # A 403 from admission (a namespace being deleted) is not RBAC's refusal.
    admission = json.loads(line(router, "create", "events"))
    admission["responseStatus"]["code"] = 403
    assert refused([json.dumps(admission)]) == {}


def rbac(verb: str, resource: str, namespace: str, name: str = "", code: int = 200) -> str:
    """A controller's request on a Role or RoleBinding, as the audit log has it."""
    event = json.loads(line("system:serviceaccount:kube-system:gc", verb, resource, code=code))
    event["objectRef"].update(apiGroup="rbac.authorization.k8s.io", namespace=namespace)
    event["objectRef"].update({"name": name} if name else {})
    return json.dumps(event)


def test_a_refusal_after_the_accounts_own_rbac_objects_went_is_teardown() -> None:
    router = "system:serviceaccount:a:x-router"
    status = ("kubeforge.dev", "services/status", "patch")
    patch = line(router, "patch", "services", "kubeforge.dev", "status", code=403)
    # The garbage collector took x's RoleBinding with the Service: the patch that follows is
    # the router's teardown, not a missing grant.
    assert refused([rbac("delete", "rolebindings", "a", "x-router"), patch]) == {}
    # Another account's objects going changes nothing for x's router.
    assert refused([rbac("delete", "rolebindings", "a", "y-router"), patch]) == {router: {status}}
    # Made again (the operator's apply makes it with a 201): refusals count again.
    again = [
        rbac("delete", "roles", "a", "x-router"),
        rbac("patch", "roles", "a", "x-router", code=201),
        patch,
    ]
    assert refused(again) == {router: {status}}
    # A namespace's deletion takes every Role in it at once; a refused delete takes none.
    assert refused([rbac("deletecollection", "roles", "a"), patch]) == {}
    assert refused([rbac("deletecollection", "roles", "b"), patch]) == {router: {status}}
    refused_gc = refused([rbac("delete", "roles", "a", "x-router", code=403), patch])
    assert refused_gc[router] == {status}
    swept_then_made = [
        rbac("deletecollection", "roles", "a"),
        rbac("create", "roles", "a", "x-router", code=201),
        patch,
    ]
    assert refused(swept_then_made) == {router: {status}}
    assert in_teardown([rbac("delete", "rolebindings", "a", "x-router"), patch]) == {
        router: {status}
    }
