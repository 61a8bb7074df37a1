"""The autoscaler's decision, as tables: load traces in, replica counts out. Pure."""

import pytest

from kubeforge.cli import service_table
from kubeforge.operator.autoscale import Policy, Sample, Why, decide, forget

POLICY = Policy(
    min_replicas=1, max_replicas=3, target_in_flight=2, scale_up_delay=5, scale_down_delay=15
)


def simulate(trace: list[tuple[float, float]], until: float, start: int = 1) -> list[tuple]:
    """Replay a load trace (time, load) against the operator's loop: a decision at every
    sample and at every recheck it asks for; returns (time, replicas) at each change."""
    replicas, samples, changes = start, [], []
    events = sorted({t for t, _ in trace})
    loads = dict(trace)
    now = 0.0
    while True:
        pending = [t for t in events if t >= now]
        if not pending or pending[0] > until:
            break
        now = pending[0]
        events.remove(now)
        if now in loads:
            samples.append(Sample(now, loads.pop(now)))
        samples = forget(samples, POLICY, now)
        decision = decide(POLICY, replicas, samples, now)
        if decision.replicas != replicas:
            replicas = decision.replicas
            changes.append((now, replicas))
        if decision.recheck_in is not None:
            events = sorted({*events, now + decision.recheck_in})
    return changes


@pytest.mark.parametrize(
    ("name", "trace", "changes"),
    [
        # 8 callers from t=0: up to 3 (the max) once the load held 5 s; down to 1 once it was
        # zero for 15 s.
        ("burst of load", [(0, 8), (30, 0)], [(5, 3), (45, 1)]),
        # Load that needs 2 replicas: no further.
        ("moderate load", [(0, 3), (40, 0)], [(5, 2), (55, 1)]),
        # A spike shorter than scaleUpDelay moves nothing.
        ("short spike", [(0, 0), (10, 8), (13, 0)], []),
        # A lull shorter than scaleDownDelay moves nothing; the count does not flap.
        ("short lull", [(0, 8), (20, 0), (30, 8), (60, 0)], [(5, 3), (75, 1)]),
        # Load falling in steps comes down in steps, each after its window.
        ("stepping down", [(0, 6), (10, 3), (40, 0)], [(5, 3), (25, 2), (55, 1)]),
        # Noise around the target does not flap either.
        ("noise", [(0, 2), (1, 3), (2, 2), (3, 3), (4, 2), (5, 3), (6, 2)], []),
    ],
)
def test_load_traces_to_replica_counts(name: str, trace: list, changes: list) -> None:
    assert simulate(trace, until=200) == changes, name


def test_the_count_stays_within_bounds_at_once() -> None:
    d = decide(POLICY, 7, [Sample(0, 0)], 1)
    assert (d.replicas, d.why) == (3, Why.OUT_OF_BOUNDS)
    d = decide(POLICY, 0, [], 1)
    assert (d.replicas, d.why) == (1, Why.OUT_OF_BOUNDS)
    assert decide(POLICY, 2, [], 1).why == Why.NO_METRICS


def test_a_full_cluster_holds_the_count_with_one_pod_pending_at_most() -> None:
    wide = Policy(1, 6, 1, 5, 15)
    busy = [Sample(0, 20)]
    d = decide(wide, 6, busy, 10, unschedulable=2, scheduler_says="0/1 nodes: Insufficient gpu")
    assert (d.replicas, d.why) == (5, Why.AT_CAPACITY)
    assert "Insufficient gpu" in d.message
    d = decide(wide, 5, busy, 11, unschedulable=1, scheduler_says="...")
    assert (d.replicas, d.why) == (5, Why.AT_CAPACITY)  # holds; does not grow
    assert decide(wide, 5, busy, 12).replicas == 6  # the pending pod scheduled: grows again


def test_a_pending_change_asks_to_be_looked_at_when_its_window_ends() -> None:
    d = decide(POLICY, 1, [Sample(0, 8)], 2)
    assert (d.replicas, d.why, d.recheck_in) == (1, Why.STABLE, 3)
    d = decide(POLICY, 3, [Sample(0, 8), Sample(10, 0)], 12)
    assert d.recheck_in == 13
    assert decide(POLICY, 3, [Sample(0, 8)], 20).recheck_in is None  # nothing pending


def test_forget_keeps_what_the_longest_window_needs() -> None:
    samples = [Sample(t, t) for t in (0, 10, 20, 30, 40)]
    assert forget(samples, POLICY, 40) == [Sample(20, 20), Sample(30, 30), Sample(40, 40)]


def test_kubeforge_status_shows_counts_the_autoscaler_and_every_replica() -> None:
    body = {
        "metadata": {"name": "auto"},
        "spec": {"replicas": 3, "autoscaling": {"maxReplicas": 3, "targetInFlight": 2}},
        "status": {
            "replicas": 3,
            "readyReplicas": 2,
            "healthyReplicas": 2,
            "updatedReplicas": 3,
            "conditions": [{"type": "Ready", "reason": "ReplicasNotReady"}],
            "autoscaler": {
                "reason": "ScaleUp",
                "lastScaleTime": "2026-11-30T21:00:00Z",
                "message": "1 -> 3 replicas: load 8 over 1 replicas is above the target",
            },
            "metrics": {
                "replicas": [
                    {"name": "auto-replica-0", "state": "HEALTHY", "inFlight": 3, "sessions": 2},
                    {"name": "auto-replica-1", "state": "HEALTHY", "requestRate": 4.5},
                ]
            },
            "replicaStatuses": [
                {"pod": "auto-replica-0", "phase": "Running"},
                {"pod": "auto-replica-1", "phase": "Running"},
                {"pod": "auto-replica-2", "phase": "Pending", "reason": "Unschedulable"},
            ],
        },
    }
    lines = service_table(body).splitlines()
    assert lines[0] == (
        "auto: desired 3, replicas 3, ready 2, healthy 2, updated 3 (ReplicasNotReady)"
    )
    assert lines[1] == (
        "autoscaler: ScaleUp 2026-11-30T21:00:00Z: 1 -> 3 replicas: load 8 over 1 replicas "
        "is above the target"
    )
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert rows["auto-replica-0"][1:5] == ["HEALTHY", "3", "0", "2"]
    assert rows["auto-replica-1"][5] == "4.5"
    assert rows["auto-replica-2"][1] == "PENDING" and rows["auto-replica-2"][-1] == "Unschedulable"
