"""Reconcile planning: from the Service's spec and the pods that exist, what to do next.

Level-based and idempotent: the plan depends only on what is observed now, so the operator can
be killed and restarted at any moment and converge to the same place.

One pass: replace failed replicas, then either scale (when the count is off) or roll the
template forward (when it is right), then describe the result in status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kubeforge.operator.groups import FAILED, GROUP_RESTART, Join, fold


class ConditionType(StrEnum):
    """The Service's status.conditions types (DESIGN §5; there is no `phase`)."""

    READY = "Ready"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"


class Reason(StrEnum):
    """Reasons on conditions, events and replica entries: wire values that users and tools match."""

    # Ready
    ALL_REPLICAS_READY = "AllReplicasReady"
    REPLICAS_NOT_READY = "ReplicasNotReady"
    # Progressing (RollingUpdate is also the event for each replica a rollout replaces)
    SCALING_UP = "ScalingUp"
    SCALING_DOWN = "ScalingDown"
    ROLLING_UPDATE = "RollingUpdate"
    WAITING_FOR_READY = "WaitingForReady"
    STABLE = "Stable"
    # Degraded (Unschedulable is also a replica entry's reason)
    UNSCHEDULABLE = "Unschedulable"
    AT_CAPACITY = "AtCapacity"  # unschedulable while autoscaling: the count holds
    CRASH_LOOP = "CrashLoop"
    AS_EXPECTED = "AsExpected"
    # Events
    REPLICA_FAILED = "ReplicaFailed"
    GROUP_RESTART = GROUP_RESTART
    NODE_LOST = "NodeLost"
    SCALED_DOWN = "ScaledDown"
    SCALED_UP = "ScaledUp"
    # Replica entries: the kubelet's own word
    CRASH_LOOP_BACK_OFF = "CrashLoopBackOff"


@dataclass(frozen=True)
class PodView:
    """What the planner needs to know about one replica pod."""

    name: str
    index: int
    template_hash: str
    phase: str = "Pending"
    ready: bool = False
    deleting: bool = False
    unschedulable: str = ""  # the scheduler's message when it could not place the pod
    crash_looping: str = ""  # the container's waiting message when in CrashLoopBackOff
    # Evicted from a node that stopped reporting: when its grace ends (epoch seconds). No
    # kubelet will confirm its end, so after that the operator deletes it without one.
    evicted_until: float | None = None
    host: int = 0  # which pod of its replica's group (hosts > 1); 0 leads
    ip: str = ""  # the pod's IP, once it has one


@dataclass(frozen=True)
class Observed:
    """Everything one planning pass looks at, read from the cluster just before it."""

    desired: int  # spec.replicas
    template_hash: str  # hash of the pod template the spec asks for now
    pods: list[PodView]  # every replica pod, including ones being deleted
    generation: int  # metadata.generation, echoed as observedGeneration
    selector: str  # label selector of the replica pods (scale subresource)
    endpoint: str  # the router's URL
    previous_conditions: list[dict[str, Any]]  # status.conditions as last written
    now: str  # RFC 3339 timestamp for conditions that change status in this pass
    clock: float = 0.0  # the same moment in epoch seconds
    hosts: int = 1  # pods per replica (spec.hosts)
    autoscaling: bool = False  # the operator owns spec.replicas (spec.autoscaling)
    sessions: dict[str, int] = field(default_factory=dict)  # per replica, as routers publish


@dataclass
class Plan:
    create: list[int] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, str]] = field(default_factory=list)  # (reason, message)
    # Pods evicted from a lost node whose grace has run out: deleted with no grace, so that
    # their index is free for a replacement on a node that works.
    force_delete: list[str] = field(default_factory=list)
    recheck_in: float | None = None  # seconds until the next such grace runs out
    join: list[Join] = field(default_factory=list)  # pods of a group after its leader


def plan(observed: Observed) -> Plan:
    """Decide which replica pods to create and delete, and the status that describes them.

    A replica of several hosts is a group of pods that the planner sees as one (`groups`).
    """
    groups = fold(observed.pods, observed.hosts)
    replicas = groups.replicas
    live = sorted((p for p in replicas if not p.deleting), key=lambda p: p.index)
    settling = any(p.deleting for p in replicas)
    live, replaced = _replace_failed(live)
    # A failed or deleting pod holds its index until it is gone; its replacement then takes the
    # same one (session ids and names stay stable), as soon as the pod's deletion is seen.
    holding = len(live) + len(replaced.delete) + sum(p.deleting for p in replicas)
    if len(live) > observed.desired:
        live, change = _scale_down(live, observed.desired, observed)
    elif holding < observed.desired:
        change = _scale_up(observed.desired, replicas, holding)
    else:
        change = _roll(live, observed.template_hash, settling)
    decided = replaced.delete + change.delete
    out = Plan(
        create=change.create,
        delete=groups.delete + [pod for name in decided for pod in groups.members[name]],
        events=groups.events + replaced.events + change.events,
        join=groups.join,
    )
    _release_lost(observed, out)
    out.status = _status(observed, live, settling, out)
    return out


def _release_lost(observed: Observed, out: Plan) -> None:
    """Pods evicted from a lost node wait out their own grace, then are deleted without one."""
    for pod in observed.pods:
        if pod.evicted_until is None:
            continue
        left = pod.evicted_until - observed.clock
        if left <= 0:
            out.force_delete.append(pod.name)
            out.events.append(
                _event(Reason.NODE_LOST, f"{pod.name} was evicted from a lost node; replacing it")
            )
        elif out.recheck_in is None or left < out.recheck_in:
            out.recheck_in = left


def _event(reason: Reason, message: str) -> tuple[str, str]:
    """An event as (reason, message), with the reason as a plain str: the wire value, no enum."""
    return (reason.value, message)


def _replace_failed(live: list[PodView]) -> tuple[list[PodView], Plan]:
    """Delete failed pods: they never recover. Each is recreated under its own index by the
    pass after it is gone (its name is taken until then), so names stay dense.

    Returns the replicas that remain, and the deletions.
    """
    failed = [p for p in live if p.phase == FAILED]
    return [p for p in live if p.phase != FAILED], Plan(
        delete=[p.name for p in failed],
        events=[_event(Reason.REPLICA_FAILED, f"{p.name} failed; replacing it") for p in failed],
    )


def _scale_down(
    live: list[PodView], desired: int, observed: Observed
) -> tuple[list[PodView], Plan]:
    """Remove the surplus: unready replicas first (they serve nothing), then the highest index,
    so the indices that stay are the dense low ones. The autoscaler's scale-downs take the
    replicas with the fewest sessions before the highest index: fewer sessions move.

    Returns the replicas that remain, and the deletions.
    """

    def sessions(p: PodView) -> int:
        return observed.sessions.get(p.name, 0) if observed.autoscaling else 0

    gone = sorted(live, key=lambda p: (p.ready, sessions(p), -p.index))[: len(live) - desired]
    return [p for p in live if p not in gone], Plan(
        delete=[p.name for p in gone],
        events=[_event(Reason.SCALED_DOWN, f"removed {p.name}") for p in gone],
    )


def _scale_up(desired: int, replicas: list[PodView], live: int) -> Plan:
    """Create the missing replicas at the lowest free indices, so names stay dense and stable.

    An index stays taken while any pod holds it, even one being deleted or failed: its name
    frees up only once that pod is gone.
    """
    taken = {p.index for p in replicas}
    free = (i for i in range(desired + len(replicas)) if i not in taken)
    create = [next(free) for _ in range(desired - live)]
    return Plan(
        create=create,
        events=[_event(Reason.SCALED_UP, f"creating replica {i}") for i in create],
    )


def _roll(live: list[PodView], template_hash: str, settling: bool) -> Plan:
    """Move outdated replicas to the new template one at a time: delete one, and the next pass
    recreates it updated. GPUs asked for never exceed replicas x gpusPerReplica.

    Nothing goes while a pod is still being deleted. When all replicas are ready the highest
    outdated index goes; when exactly one is unready and it is outdated, it goes (it is already
    down, so replacing it costs nothing); otherwise wait for readiness.
    """
    outdated = [p for p in live if p.template_hash != template_hash]
    if not outdated or settling:
        return Plan()
    ready = sum(p.ready for p in live)
    if ready == len(live):
        victim = max(outdated, key=lambda p: p.index)
        message = f"replacing {victim.name} with the new template"
    elif ready == len(live) - 1 and (down := [p for p in outdated if not p.ready]):
        victim = down[0]
        message = f"replacing {victim.name}"
    else:
        return Plan()
    return Plan(delete=[victim.name], events=[_event(Reason.ROLLING_UPDATE, message)])


def _status(
    observed: Observed, live: list[PodView], settling: bool, decided: Plan
) -> dict[str, Any]:
    """The status block. Counts leave out the pods this pass deletes, so they describe where
    the plan leads rather than replicas about to go.

    `live` is the replicas after failed and scaled-down pods are dropped; it still holds a
    rollout's victim, which counts as not yet updated.
    """
    remaining = [p for p in live if p.name not in decided.delete]
    ready = sum(p.ready for p in remaining)
    updated = sum(p.template_hash == observed.template_hash for p in remaining)
    working = bool(
        decided.create
        or decided.delete
        or settling
        or updated < len(live)
        or ready < observed.desired
    )
    progressing = _progressing_reason(
        creating=bool(decided.create),
        removing=any(reason == Reason.SCALED_DOWN for reason, _ in decided.events),
        replicas=len(live),
        updated=updated,
        working=working,
    )
    return {
        "observedGeneration": observed.generation,
        "replicas": len(remaining),
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "selector": observed.selector,
        "endpoint": observed.endpoint,
        "conditions": _conditions(
            observed, live, ready=ready, updated=updated, working=working, progressing=progressing
        ),
        "replicaStatuses": [_replica_status(p) for p in remaining],
    }


def _progressing_reason(
    *, creating: bool, removing: bool, replicas: int, updated: int, working: bool
) -> Reason:
    """Why the Service is (or is not) progressing: the first that applies, most specific first.

    `replicas` counts the live replicas after this pass's scale-down, `updated` those on the
    current template that this pass keeps.
    """
    if creating:
        return Reason.SCALING_UP
    if removing:
        return Reason.SCALING_DOWN
    if updated < replicas:
        return Reason.ROLLING_UPDATE
    if working:
        return Reason.WAITING_FOR_READY
    return Reason.STABLE


def _degraded(live: list[PodView], autoscaling: bool) -> tuple[Reason, str]:
    """What keeps replicas from running, if anything: the scheduler's reason (not enough GPUs)
    outranks a crash loop, since a pod that cannot be placed never gets to crash. While the
    autoscaler owns the count, a pod the scheduler cannot place means the cluster is full."""
    unschedulable = [p for p in live if p.unschedulable]
    if unschedulable:
        first = unschedulable[0]
        return Reason.AT_CAPACITY if autoscaling else Reason.UNSCHEDULABLE, (
            f"{len(unschedulable)} replica(s) cannot be scheduled: "
            f"{first.name}: {first.unschedulable}"
        )
    crashing = [p for p in live if p.crash_looping]
    if crashing:
        return Reason.CRASH_LOOP, f"{crashing[0].name}: {crashing[0].crash_looping}"
    return Reason.AS_EXPECTED, ""


def _conditions(
    observed: Observed,
    live: list[PodView],
    *,
    ready: int,
    updated: int,
    working: bool,
    progressing: Reason,
) -> list[dict[str, Any]]:
    """Ready, Progressing and Degraded, each with a reason a person or a tool can act on."""
    previous = {c["type"]: c for c in observed.previous_conditions}

    def condition(kind: ConditionType, ok: bool, reason: Reason, message: str) -> dict[str, Any]:
        return _condition(
            kind, ok, reason, message, observed.generation, previous.get(kind, {}), observed.now
        )

    all_ready = ready >= observed.desired
    degraded, why = _degraded(live, observed.autoscaling)
    return [
        condition(
            ConditionType.READY,
            all_ready,
            Reason.ALL_REPLICAS_READY if all_ready else Reason.REPLICAS_NOT_READY,
            f"{ready}/{observed.desired} replicas ready",
        ),
        condition(
            ConditionType.PROGRESSING,
            working,
            progressing,
            f"{updated}/{observed.desired} replicas up to date",
        ),
        condition(ConditionType.DEGRADED, degraded != Reason.AS_EXPECTED, degraded, why),
    ]


def _condition(
    kind: ConditionType,
    ok: bool,
    reason: Reason,
    message: str,
    generation: int,
    before: dict[str, Any],
    now: str,
) -> dict[str, Any]:
    """One condition. lastTransitionTime moves only when the status flips (a new reason or
    message alone keeps it), so it tells how long the Service has been in this state."""
    status = "True" if ok else "False"
    changed = before.get("status") != status
    return {
        "type": kind.value,
        "status": status,
        "reason": reason.value,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": now if changed else before.get("lastTransitionTime", now),
    }


def _replica_status(pod: PodView) -> dict[str, Any]:
    """One replica's entry, with why it is not running when the scheduler or kubelet says."""
    reason = ""
    if pod.unschedulable:
        reason = Reason.UNSCHEDULABLE.value
    elif pod.crash_looping:
        reason = Reason.CRASH_LOOP_BACK_OFF.value
    return {
        "index": pod.index,
        "pod": pod.name,
        "phase": pod.phase,
        "ready": pod.ready,
        "reason": reason,
    }
