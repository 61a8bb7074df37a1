"""Replicas that span hosts: a group of `hosts` pods counts, rolls and fails as one replica.

Pod 0 of a group (the leader) runs rank 0; the operator creates it first, and the other pods
once the leader has an address, since they find rank 0 at the leader's pod IP (MASTER_ADDR).
No DNS is needed, so the same works on the e2e process node and on any cluster.

All-or-nothing: when any pod of a group fails, is evicted or is being deleted, the other pods
are deleted too, and the group is recreated whole once all of them are gone. The planner sees
one `PodView` per group (ready only when every pod is), so status counts replicas, not pods.
Pure; LeaderWorkerSet's RecreateGroupOnPodRestart is the same policy.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

FAILED = "Failed"  # pod phase: the pod will not recover on its own
GROUP_RESTART = "GroupRestart"  # the event reason when a group's pods are replaced together


@dataclass(frozen=True)
class Join:
    """A pod of a group other than the leader, to create now that the leader has an IP."""

    index: int
    host: int
    leader_ip: str


@dataclass
class Folded:
    replicas: list  # one PodView per replica index
    members: dict[str, list[str]] = field(default_factory=dict)  # replica -> its pods' names
    delete: list[str] = field(default_factory=list)  # pods of groups that lost a pod
    events: list[tuple[str, str]] = field(default_factory=list)  # (reason, message)
    join: list[Join] = field(default_factory=list)


def fold(pods: list, hosts: int) -> Folded:
    """One view per replica from its pods' views (kubeforge.operator.plan.PodView)."""
    if hosts == 1 and all(p.host == 0 for p in pods):
        return Folded(replicas=list(pods), members={p.name: [p.name] for p in pods})
    by_index: dict[int, list] = defaultdict(list)
    for pod in pods:
        by_index[pod.index].append(pod)
    out = Folded(replicas=[])
    for index, members in sorted(by_index.items()):
        _fold_group(index, sorted(members, key=lambda p: p.host), hosts, out)
    return out


def _fold_group(index: int, members: list, hosts: int, out: Folded) -> None:
    leader = members[0] if members[0].host == 0 else None
    alive = [p for p in members if not p.deleting]
    stale = [p for p in alive if p.host >= hosts]  # left from a spec with more hosts
    lost = [p for p in members if p.deleting or p.phase == FAILED]
    if leader is None or lost or stale:
        # The group cannot work as it is: take the rest down, and hold the index until all of
        # its pods are gone; the next pass after that creates the group whole.
        doomed = [p.name for p in alive]
        out.delete += doomed
        first = (lost or stale or members)[0]
        if doomed:
            why = (
                "failed"
                if first.phase == FAILED
                else "is gone"
                if first.deleting
                else "is left over"
                if first in stale
                else "has no leader"
            )
            message = f"replica {index}: {first.name} {why}; restarting its pods together"
            out.events.append((GROUP_RESTART, message))
        out.replicas.append(replace(members[0], deleting=True, ready=False))
        return
    present = {p.host for p in members}
    missing = [h for h in range(1, hosts) if h not in present]
    if missing and leader.ip:
        out.join += [Join(index, h, leader.ip) for h in missing]
    hashes = {p.template_hash for p in members}
    out.members[leader.name] = [p.name for p in members]
    out.replicas.append(
        replace(
            leader,
            ready=not missing and all(p.ready for p in members),
            template_hash=leader.template_hash if len(hashes) == 1 else "",
            unschedulable=next((p.unschedulable for p in members if p.unschedulable), ""),
            crash_looping=next((p.crash_looping for p in members if p.crash_looping), ""),
        )
    )
