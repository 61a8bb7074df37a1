"""Reconcile planning: from the Service's spec and the pods that exist, what to do next.

Level-based and idempotent: the plan depends only on what is observed now, so the operator can
be killed and restarted at any moment and converge to the same place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


@dataclass
class Plan:
    create: list[int] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, str]] = field(default_factory=list)  # (reason, message)


def _condition(
    kind: str,
    ok: bool,
    reason: str,
    message: str,
    generation: int,
    previous: dict[str, dict[str, Any]],
    now: str,
) -> dict[str, Any]:
    status = "True" if ok else "False"
    before = previous.get(kind, {})
    changed = before.get("status") != status
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": now if changed else before.get("lastTransitionTime", now),
    }


def plan(
    desired: int,
    current_hash: str,
    pods: list[PodView],
    generation: int,
    selector: str,
    endpoint: str,
    previous_conditions: list[dict[str, Any]],
    now: str,
) -> Plan:
    out = Plan()
    live = sorted((p for p in pods if not p.deleting), key=lambda p: p.index)
    settling = any(p.deleting for p in pods)
    # Failed pods are replaced under the same index.
    for p in live:
        if p.phase == "Failed":
            out.delete.append(p.name)
            out.events.append(("ReplicaFailed", f"{p.name} failed; replacing it"))
    live = [p for p in live if p.phase != "Failed"]

    if len(live) > desired:
        # Scale down: unready ones first, then the highest index.
        victims = sorted(live, key=lambda p: (p.ready, -p.index))
        gone = victims[: len(live) - desired]
        out.delete += [p.name for p in gone]
        out.events += [("ScaledDown", f"removed {p.name}") for p in gone]
        live = [p for p in live if p not in gone]
    elif len(live) < desired:
        taken = {p.index for p in pods}  # a deleting pod's index frees up once it is gone
        free = (i for i in range(desired + len(pods)) if i not in taken)
        out.create = [next(free) for _ in range(desired - len(live))]
        out.events += [("ScaledUp", f"creating replica {i}") for i in out.create]
    else:
        outdated = [p for p in live if p.template_hash != current_hash]
        ready = sum(p.ready for p in live)
        if outdated and not settling and ready == len(live):
            # Roll one replica at a time: delete it, the next pass recreates it updated. GPUs
            # asked for never exceed replicas x gpusPerReplica.
            victim = max(outdated, key=lambda p: p.index)
            out.delete.append(victim.name)
            out.events.append(("RollingUpdate", f"replacing {victim.name} with the new template"))
        elif outdated and not settling and ready < len(live):
            unready_outdated = [p for p in outdated if not p.ready]
            if unready_outdated and ready >= len(live) - 1:
                victim = unready_outdated[0]  # already down: replacing it costs nothing
                out.delete.append(victim.name)
                out.events.append(("RollingUpdate", f"replacing {victim.name}"))

    ready_count = sum(p.ready for p in live if p.name not in out.delete)
    updated = sum(p.template_hash == current_hash for p in live if p.name not in out.delete)
    prev = {c["type"]: c for c in previous_conditions}
    unschedulable = [p for p in live if p.unschedulable]
    crashing = [p for p in live if p.crash_looping]
    working = bool(
        out.create or out.delete or settling or updated < len(live) or ready_count < desired
    )
    if unschedulable:
        degraded = (
            "Unschedulable",
            f"{len(unschedulable)} replica(s) cannot be scheduled: "
            f"{unschedulable[0].name}: {unschedulable[0].unschedulable}",
        )
    elif crashing:
        degraded = ("CrashLoop", f"{crashing[0].name}: {crashing[0].crash_looping}")
    else:
        degraded = ("AsExpected", "")
    conditions = [
        _condition(
            "Ready",
            ready_count >= desired,
            "AllReplicasReady" if ready_count >= desired else "ReplicasNotReady",
            f"{ready_count}/{desired} replicas ready",
            generation,
            prev,
            now,
        ),
        _condition(
            "Progressing",
            working,
            (
                "ScalingUp"
                if out.create
                else "ScalingDown"
                if len(live) > desired
                else "RollingUpdate"
                if updated < len(live)
                else "WaitingForReady"
                if working
                else "Stable"
            ),
            f"{updated}/{desired} replicas up to date",
            generation,
            prev,
            now,
        ),
        _condition(
            "Degraded",
            bool(unschedulable or crashing),
            degraded[0],
            degraded[1],
            generation,
            prev,
            now,
        ),
    ]
    out.status = {
        "observedGeneration": generation,
        "replicas": len(live) - len([n for n in out.delete if any(p.name == n for p in live)]),
        "readyReplicas": ready_count,
        "updatedReplicas": updated,
        "selector": selector,
        "endpoint": endpoint,
        "conditions": conditions,
        "replicaStatuses": [
            {
                "index": p.index,
                "pod": p.name,
                "phase": p.phase,
                "ready": p.ready,
                "reason": (p.unschedulable and "Unschedulable")
                or (p.crash_looping and "CrashLoopBackOff")
                or "",
            }
            for p in live
            if p.name not in out.delete
        ],
    }
    return out
