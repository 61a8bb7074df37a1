"""The router's half of the status: one router's share, several routers combined, pruning."""

from typing import Any

from kubeforge.api import ServiceStatus
from kubeforge.router.status import already_written, stamped, status_patch
from tests.unit.test_operator_plan import pods, run


def summary(rate: float, p50: float = 0.0012, p99: float = 0.003, in_flight: int = 1) -> Any:
    return {
        "service": {
            "healthy_replicas": 2,
            "total_request_rate": rate,
            "error_rate": 0.0,
            "p50_latency": p50,
            "p95_latency": 0.002,
            "p99_latency": p99,
            "total_sessions": 4,
        },
        "replicas": {
            0: {
                "name": "c-replica-0",
                "index": 0,
                "state": "HEALTHY",
                "request_rate": rate,
                "p50_latency": p50,
                "in_flight": in_flight,
                "queue_depth": 2,
                "assigned_sessions": 4,
            }
        },
    }


def test_one_router_writes_only_its_own_fields() -> None:
    patch = status_patch(summary(12.345), "r-a")
    assert set(patch) == {"healthyReplicas", "metrics", "routers"}
    assert not set(run(1, pods((0, True))).status) & set(patch)  # disjoint from the operator's
    metrics = patch["metrics"]
    assert metrics["requestRate"] == 12.35
    assert metrics["activeSessions"] == 4 and metrics["queueDepth"] == 2
    assert metrics["replicas"][0]["p50LatencyMs"] == 1.2
    assert patch["routers"]["r-a"]["requestRate"] == 12.35
    # What the CRD's status schema accepts, with a timestamp on both places that carry one.
    ServiceStatus.model_validate(stamped(patch, "2026-11-28T00:00:00Z"))


def test_two_routers_add_rates_and_keep_the_worst_tail() -> None:
    b = status_patch(summary(30.0, p50=0.004, p99=0.009, in_flight=3), "r-b")
    a = status_patch(summary(10.0), "r-a", peers=b["routers"], live={"r-a", "r-b"})
    metrics = a["metrics"]
    assert metrics["requestRate"] == 40.0
    assert metrics["inFlight"] == 4
    assert metrics["p99LatencyMs"] == 9.0  # the slower router's tail
    assert metrics["p50LatencyMs"] == (10 * 1.2 + 30 * 4.0) / 40  # weighted by traffic
    assert metrics["replicas"][0]["requestRate"] == 40.0
    assert metrics["activeSessions"] == 4  # sessions live on replicas: not counted twice
    assert set(a["routers"]) == {"r-a"}  # a router writes only its own share
    # Both routers compute the same totals from the same shares, whichever writes.
    b_again = status_patch(
        summary(30.0, p50=0.004, p99=0.009, in_flight=3),
        "r-b",
        peers={**a["routers"], **b["routers"]},
        live={"r-a", "r-b"},
    )
    assert b_again["metrics"] == metrics


def test_a_gone_router_is_left_out_and_removed() -> None:
    old = status_patch(summary(50.0), "r-old")["routers"]
    patch = status_patch(summary(10.0), "r-a", peers=old, live={"r-a"})
    assert patch["metrics"]["requestRate"] == 10.0
    assert patch["routers"] == {"r-a": patch["routers"]["r-a"], "r-old": None}
    # While the router pods are not listed yet, nothing is pruned.
    unknown = status_patch(summary(10.0), "r-a", peers=old, live=None)
    assert unknown["metrics"]["requestRate"] == 60.0 and "r-old" not in unknown["routers"]


def test_no_write_when_status_already_says_it() -> None:
    patch = status_patch(summary(10.0), "r-a")
    written = stamped(patch, "2026-11-28T00:00:00Z")
    assert already_written(patch, written)
    assert not already_written(patch, None)
    assert not already_written(status_patch(summary(11.0), "r-a"), written)
    pruning = status_patch(summary(10.0), "r-a", peers={"r-x": {}}, live={"r-a"})
    assert not already_written(pruning, {**written, "routers": {**written["routers"], "r-x": {}}})
    assert already_written(pruning, written)
