"""The operator's RBAC rules, one list for every place that ships them: deploy/ and the chart."""

from __future__ import annotations

from typing import Any

import yaml

from kubeforge.contract import GROUP, PLURAL

NAMESPACE_RULES: list[dict[str, Any]] = [
    # Exactly what the e2e tier sees it use (tests/e2e/test_rbac_audit.py fails on a grant that
    # is never used and on a use that is not granted).
    # The resource it reconciles: watched, annotated by kopf (progress), status written.
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["patch"]},
    # Replica pods: watched, created by index, deleted on scale-down and rollout.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch", "create", "delete"]},
    # The children: watched (a drifted or deleted one is restored at once) and converged by
    # server-side apply (patch; create when missing). The token Secret is only ever created.
    *(
        {
            "apiGroups": [group],
            "resources": resources,
            "verbs": ["list", "watch", "create", "patch"],
        }
        for group, resources in (
            ("", ["services", "serviceaccounts"]),
            ("apps", ["deployments"]),
            ("rbac.authorization.k8s.io", ["roles", "rolebindings"]),
            ("networking.k8s.io", ["networkpolicies"]),
        )
    ),
    # A Service's NetworkPolicies go when its spec turns them off.
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["delete"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    # The Certificate cert-manager issues a Service's TLS from, when its spec names an issuer
    # (server-side apply: patch, and create when missing).
    {"apiGroups": ["cert-manager.io"], "resources": ["certificates"], "verbs": ["create", "patch"]},
    # What it does, as Events on the Service.
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]

# Cluster-wide only: kopf watches resource definitions, so that a CRD installed after the
# operator is found. An operator of named namespaces needs nothing beyond them (it does not
# scan), so a namespaced install ships NAMESPACE_RULES alone, as a Role in each namespace.
CLUSTER_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["list", "watch"],
    },
]
OPERATOR_RULES = [*NAMESPACE_RULES, *CLUSTER_RULES]

NAMESPACE = "kubeforge-system"
NAME = "kubeforge-operator"


def deploy_manifest() -> str:
    docs = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": NAME, "namespace": NAMESPACE},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": NAME},
            "rules": OPERATOR_RULES,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": NAME},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": NAME,
            },
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}],
        },
    ]
    header = (
        "# Least privilege for the kubeforge operator: exactly the verbs it uses.\n"
        "# Generated from kubeforge/operator/rbac.py by `make crds`. Do not edit.\n"
    )
    return header + yaml.safe_dump_all(docs, sort_keys=False, width=100)


def chart_rules() -> str:
    """The rules the chart's templates include: `rules` for its ClusterRole (an operator of
    every namespace), `namespaceRules` for the Role in each namespace of a namespaced one."""
    header = "# Generated from kubeforge/operator/rbac.py by `make crds`. Do not edit.\n"
    rules = {"rules": OPERATOR_RULES, "namespaceRules": NAMESPACE_RULES}
    return header + yaml.safe_dump(rules, sort_keys=False, width=100)
