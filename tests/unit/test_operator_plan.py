"""The reconcile planner and the manifests it leads to: pure, no cluster."""

from typing import Any

import pytest

from kubeforge.operator.manifests import GPU, pod_template, replica_pod, template_hash
from kubeforge.operator.plan import (
    ConditionType,
    Observed,
    Plan,
    PodView,
    Reason,
    _progressing_reason,
    plan,
)

H = "h1"


def pods(*specs: tuple[int, bool], hash_: str = H) -> list[PodView]:
    return [PodView(f"s-replica-{i}", i, hash_, "Running", ready) for i, ready in specs]


def run(
    desired: int,
    current: list[PodView],
    hash_: str = H,
    prev: list[dict[str, Any]] | None = None,
    hosts: int = 1,
) -> Plan:
    return plan(
        Observed(
            desired=desired,
            template_hash=hash_,
            pods=current,
            generation=3,
            selector="sel",
            endpoint="http://x",
            previous_conditions=prev or [],
            now="T",
            hosts=hosts,
        )
    )


def cond(p: Plan, kind: str) -> dict[str, Any]:
    return next(c for c in p.status["conditions"] if c["type"] == kind)


def test_scale_up_fills_the_lowest_free_indices() -> None:
    p = run(5, pods((0, True), (2, True), (4, True)))
    assert p.create == [1, 3] and p.delete == []
    assert cond(p, ConditionType.PROGRESSING)["reason"] == Reason.SCALING_UP


def test_scale_down_removes_unready_first_then_highest_index() -> None:
    p = run(2, pods((0, True), (1, False), (2, True), (3, True)))
    assert p.delete == ["s-replica-1", "s-replica-3"]
    p = run(2, pods((0, True), (1, True), (2, True), (3, True)))
    assert p.delete == ["s-replica-3", "s-replica-2"]


def test_rollout_replaces_one_replica_at_a_time_only_when_all_are_ready() -> None:
    old = pods((0, True), (1, True), (2, True), hash_="old")
    p = run(3, old, hash_="new")
    assert p.delete == ["s-replica-2"] and p.create == []
    # While that one is being deleted nothing else goes.
    deleting = [*old[:2], PodView("s-replica-2", 2, "old", "Running", True, deleting=True)]
    assert run(3, deleting, hash_="new").delete == []
    # Recreated (new hash) but not ready yet: wait.
    waiting = [*old[:2], PodView("s-replica-2", 2, "new", "Running", False)]
    assert run(3, waiting, hash_="new").delete == []
    ready = [*old[:2], PodView("s-replica-2", 2, "new", "Running", True)]
    assert run(3, ready, hash_="new").delete == ["s-replica-1"]


def test_missing_and_failed_pods_come_back_under_their_index() -> None:
    assert run(3, pods((0, True), (2, True))).create == [1]
    failed = [*pods((0, True), (2, True)), PodView("s-replica-1", 1, H, "Failed")]
    replaced = run(3, failed)
    assert (replaced.delete, replaced.create) == (["s-replica-1"], [])  # not as replica-3
    gone = [p for p in failed if p.index != 1]
    assert run(3, gone).create == [1]
    # A pod being deleted (kubectl delete, eviction) holds its index until it is gone.
    deleting = [*pods((0, True), (2, True)), PodView("s-replica-1", 1, H, "Running", deleting=True)]
    assert run(3, deleting).create == []
    assert run(3, gone).create == [1]


def test_scaling_down_says_so() -> None:
    p = run(1, pods((0, True), (1, True), (2, True)))
    assert p.delete == ["s-replica-2", "s-replica-1"]
    progressing = next(c for c in p.status["conditions"] if c["type"] == "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "ScalingDown")


def test_conditions_carry_reasons_and_keep_transition_times() -> None:
    stuck = [
        *pods((0, True)),
        PodView(
            "s-replica-1",
            1,
            H,
            "Pending",
            unschedulable=("0/1 nodes are available: 1 Insufficient nvidia.com/gpu."),
        ),
    ]
    p = run(2, stuck)
    assert cond(p, ConditionType.READY)["status"] == "False"
    degraded = cond(p, ConditionType.DEGRADED)
    assert degraded["status"] == "True" and degraded["reason"] == "Unschedulable"  # wire value
    assert "Insufficient nvidia.com/gpu" in degraded["message"]
    fine = run(
        1,
        pods((0, True)),
        prev=[{"type": "Ready", "status": "True", "lastTransitionTime": "EARLIER"}],
    )
    assert cond(fine, ConditionType.READY)["lastTransitionTime"] == "EARLIER"  # unchanged status
    assert fine.status["readyReplicas"] == 1 and fine.status["observedGeneration"] == 3


@pytest.mark.parametrize(
    ("creating", "removing", "replicas", "updated", "working", "reason"),
    [
        (True, False, 2, 2, True, Reason.SCALING_UP),
        (True, True, 3, 1, True, Reason.SCALING_UP),  # creating wins over everything after it
        (False, True, 3, 3, True, Reason.SCALING_DOWN),
        (False, True, 3, 1, True, Reason.SCALING_DOWN),  # over a rollout too
        (False, False, 3, 2, True, Reason.ROLLING_UPDATE),
        (False, False, 3, 3, True, Reason.WAITING_FOR_READY),
        (False, False, 3, 3, False, Reason.STABLE),
        (False, False, 0, 0, False, Reason.STABLE),
    ],
)
def test_progressing_reason_takes_the_first_that_applies(
    creating: bool, removing: bool, replicas: int, updated: int, working: bool, reason: Reason
) -> None:
    got = _progressing_reason(
        creating=creating, removing=removing, replicas=replicas, updated=updated, working=working
    )
    assert got == reason


@pytest.mark.parametrize(
    ("desired", "current", "hash_", "working", "reason"),
    [
        (3, pods((0, True), (1, True)), H, True, Reason.SCALING_UP),
        (2, pods((0, True), (1, True), hash_="old"), H, True, Reason.ROLLING_UPDATE),
        (2, pods((0, True), (1, False)), H, True, Reason.WAITING_FOR_READY),
        (2, pods((0, True), (1, True)), H, False, Reason.STABLE),
    ],
)
def test_progressing_condition_says_what_the_pass_is_doing(
    desired: int, current: list[PodView], hash_: str, working: bool, reason: Reason
) -> None:
    progressing = cond(run(desired, current, hash_), ConditionType.PROGRESSING)
    assert progressing["status"] == str(working) and progressing["reason"] == reason


def was(status: str, **fields: str) -> dict[str, str]:
    """A condition's fields as an earlier pass wrote them."""
    return {"status": status, "lastTransitionTime": "EARLIER", **fields}


# A steady Service (one ready replica): Ready True, Progressing False, Degraded False.
@pytest.mark.parametrize(
    ("kind", "before", "transition"),
    [
        (ConditionType.READY, was("True"), "EARLIER"),
        (ConditionType.READY, was("False"), "T"),
        (ConditionType.PROGRESSING, was("False"), "EARLIER"),
        (ConditionType.PROGRESSING, was("True"), "T"),
        (ConditionType.DEGRADED, was("False"), "EARLIER"),
        (ConditionType.DEGRADED, was("True"), "T"),
        # Only the status counts: a different reason or message keeps the time.
        (ConditionType.PROGRESSING, was("False", reason="ScalingUp"), "EARLIER"),
        (ConditionType.READY, was("True", message="0/1 replicas ready"), "EARLIER"),
        # Same status but no time recorded, or never written before: stamp it now.
        (ConditionType.READY, {"status": "True"}, "T"),
        (ConditionType.READY, None, "T"),
    ],
)
def test_last_transition_time_moves_only_when_status_changes(
    kind: ConditionType, before: dict[str, Any] | None, transition: str
) -> None:
    prev = [] if before is None else [{"type": kind.value, **before}]
    assert cond(run(1, pods((0, True)), prev=prev), kind)["lastTransitionTime"] == transition


BODY = {
    "apiVersion": "kubeforge.dev/v1alpha1",
    "kind": "Service",
    "metadata": {
        "name": "counter",
        "namespace": "ns",
        "uid": "u-1",
        "labels": {"kueue.x-k8s.io/queue-name": "q", "kubeforge.dev/x": "no"},
    },
    "spec": {
        "replicas": 3,
        "gpusPerReplica": 1,
        "actor": "examples.counter:Counter",
        "kwargs": {"start": 0},
        "nodeSelector": {"gpu": "h100"},
    },
}


def test_replica_pod_manifest() -> None:
    pod = replica_pod(BODY, 2)
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["name"] == "counter-replica-2"
    assert meta["labels"]["kubeforge.dev/replica-index"] == "2"
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "q"  # reaches the pods
    assert "kubeforge.dev/x" not in meta["labels"]  # our own prefix is not copied
    assert meta["ownerReferences"][0]["uid"] == "u-1"
    c = spec["containers"][0]
    assert c["command"] == ["python", "-m", "kubeforge.replica"]
    assert c["args"][:2] == ["--actor", "examples.counter:Counter"]
    assert c["resources"]["limits"][GPU] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Liveness waits for the port (startupProbe: 2 min) and then for 30 s of silence, and no
    # probe fails a process for waiting on a busy CPU for less than 5 s.
    startup, live = c["startupProbe"], c["livenessProbe"]
    assert startup["httpGet"]["path"] == live["httpGet"]["path"] == "/healthz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert live["periodSeconds"] * live["failureThreshold"] >= 30
    assert min(p["timeoutSeconds"] for p in (startup, live, c["readinessProbe"])) >= 5
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False  # no credentials in a replica
    assert spec["nodeSelector"] == {"gpu": "h100"}


def test_template_hash_changes_with_the_spec_not_the_index() -> None:
    h = template_hash(pod_template(BODY))
    assert replica_pod(BODY, 0)["metadata"]["labels"]["kubeforge.dev/template-hash"] == h
    changed = {**BODY, "spec": {**BODY["spec"], "args": [1]}}
    assert template_hash(pod_template(changed)) != h
    scaled = {**BODY, "spec": {**BODY["spec"], "replicas": 9}}
    assert template_hash(pod_template(scaled)) == h


def test_pods_evicted_from_a_lost_node_are_released_when_their_grace_ends() -> None:
    """Past its deletion deadline nobody will confirm the pod's end: deleted with no grace,
    its index then comes back. Before that, the plan asks to be run again when it ends."""
    evicted = [
        PodView("s-replica-0", 0, H, "Running", True),
        PodView("s-replica-1", 1, H, "Running", False, deleting=True, evicted_until=100.0),
        PodView("s-replica-2", 2, H, "Running", False, deleting=True, evicted_until=103.5),
    ]
    observed = Observed(3, H, evicted, 1, "sel", "http://x", [], "T", clock=101.0)
    p = plan(observed)
    assert p.force_delete == ["s-replica-1"] and p.recheck_in == 2.5
    assert p.create == [] and p.delete == []  # both indices still held until they are gone
    assert [r for r, _ in p.events] == [Reason.NODE_LOST]
    deleting_only = [PodView("s-replica-0", 0, H, "Running", True, deleting=True)]
    assert plan(Observed(1, H, deleting_only, 1, "sel", "http://x", [], "T", clock=5.0)) == Plan(
        status=plan(Observed(1, H, deleting_only, 1, "sel", "http://x", [], "T")).status
    )  # an ordinary deletion is left to its kubelet


def test_replica_pods_tolerate_a_lost_node_for_node_loss_grace() -> None:
    body = {
        "metadata": {"name": "s", "namespace": "ns", "uid": "u"},
        "spec": {
            "actor": "m:A",
            "nodeLossGrace": "7s",
            "tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists"}],
        },
    }
    tolerations = pod_template(body)["spec"]["tolerations"]
    assert tolerations == [
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists"},  # the user's, kept
        {
            "key": "node.kubernetes.io/not-ready",
            "operator": "Exists",
            "effect": "NoExecute",
            "tolerationSeconds": 7,
        },
    ]
    default = pod_template({**body, "spec": {"actor": "m:A"}})["spec"]["tolerations"]
    assert {t["tolerationSeconds"] for t in default} == {30}
