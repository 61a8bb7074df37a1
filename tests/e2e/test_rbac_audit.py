"""RBAC audit: every request the operator and the routers made during the e2e tier, from the
API server's audit log, against the rules they ship with. Fails when one made a request its
rules do not grant (RBAC refused it, or worse, another grant allowed it), or when a rule grants
something the tier never used: least privilege, checked against what the code really does.

It runs after every other test of the tier (marker `after_all`) and only makes sense with the
whole tier before it: run alone, it fails saying so."""

from __future__ import annotations

from typing import Any

import pytest

from kubeforge.operator.manifests import router_rules
from kubeforge.operator.rbac import NAMESPACE_RULES, OPERATOR_RULES
from tests.e2e.rbac_audit import describe, granted, in_teardown, of_users, refused, used

pytestmark = [pytest.mark.process_node, pytest.mark.after_all]

OPERATOR = r"system:serviceaccount:kubeforge-system:kubeforge-operator"  # deploy/operator-rbac.yaml
CHART_OPERATOR = r"system:serviceaccount:kf-system:kf-operator"  # test_chart's cluster-wide install
NAMESPACED_OPERATOR = r"system:serviceaccount:kfns-system:kfns-operator"  # and its namespaced one
ROUTERS = r"system:serviceaccount:[^:]+:[^:]+-router"


def test_the_operator_and_routers_use_exactly_what_they_are_granted(cluster: Any) -> None:
    lines = cluster.control.audit_log.read_text().splitlines()
    by_user, never_allowed = used(lines), refused(lines)
    operator, routers = of_users(by_user, OPERATOR), of_users(by_user, ROUTERS)
    assert operator and routers, (
        "no request of the operator or of a router in the audit log: this test reads what the "
        "whole e2e tier did, run it with the tier (make e2e)"
    )
    router_grant = granted(router_rules("any"))  # names aside: what a router may do
    checks = {
        "the operator used what it is not granted": operator - granted(OPERATOR_RULES),
        "the chart's operator used what it is not granted": of_users(by_user, CHART_OPERATOR)
        - granted(OPERATOR_RULES),
        "the namespaced operator used what its Roles do not grant": of_users(
            by_user, NAMESPACED_OPERATOR
        )
        - granted(NAMESPACE_RULES),
        "a router used what its Role does not grant": routers - router_grant,
        "RBAC refused the operator, and never allowed it": of_users(never_allowed, OPERATOR),
        "RBAC refused a router, and never allowed it": of_users(never_allowed, ROUTERS),
        # The operator must hold what it grants routers (RBAC lets nobody grant more than it
        # has), whether or not it uses it itself.
        "the operator is granted what it never used": granted(OPERATOR_RULES)
        - operator
        - router_grant,
        "routers are granted what they never used": router_grant - routers,
    }
    failed = [f"{why}: {', '.join(describe(found))}" for why, found in checks.items() if found]
    if failed:  # in full: pytest shortens an assertion's long values
        pytest.fail("\n".join(failed), pytrace=False)
    print(
        f"audit: the operator made {len(operator)} kinds of request, routers {len(routers)}; "
        "each granted, each grant used"
    )
    for user, found in sorted(in_teardown(lines).items()):
        print(f"refused after {user}'s Role went (its teardown): {', '.join(describe(found))}")
