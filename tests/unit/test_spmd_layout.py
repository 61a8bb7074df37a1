"""SPMD replicas, the pure parts: each rank's environment, replica groups in the planner, and
the pods of a group. No processes, no cluster."""

from typing import Any

import pytest

from kubeforge import ranks
from kubeforge.api import ServiceSpec
from kubeforge.contract import L_HASH, L_HOST
from kubeforge.operator.manifests import GPU, replica_pod
from kubeforge.operator.plan import Plan, PodView, Reason
from kubeforge.ranks import Layout, RankError, rank_envs
from tests.unit.test_operator_plan import run as plan_of

# ranks ---------------------------------------------------------------------------------------


def test_every_rank_gets_what_env_rendezvous_reads() -> None:
    envs = rank_envs(Layout(procs=2, hosts=3, host_index=1), "10.0.0.7", 29500, None)
    assert envs == [
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(local),
            "WORLD_SIZE": "6",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.7",
            "MASTER_PORT": "29500",
        }
        for local, rank in enumerate((2, 3))
    ]


def test_each_rank_gets_its_own_gpus() -> None:
    envs = rank_envs(Layout(procs=2, gpus_per_rank=2), "a", 1, ["4", "5", "6", "7"])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["4,5", "6,7"]
    # In a pod nothing narrows the devices: the runtime shows the pod's own as 0..n-1.
    envs = rank_envs(Layout(procs=4, gpus_per_rank=1), "a", 1, None)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "2", "3"]
    with pytest.raises(RankError, match="2 ranks x 1 GPUs need 2 GPUs; this replica has 1"):
        rank_envs(Layout(procs=2, gpus_per_rank=1), "a", 1, ["3"])


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (dict(procs=0), "procs and hosts must be at least 1"),
        (dict(procs=1, hosts=2, host_index=2), "host index 2 is not below hosts=2"),
        (dict(procs=1, gpus_per_rank=-1), "gpus per rank must be >= 0"),
    ],
)
def test_a_layout_that_cannot_run_is_refused(layout: dict[str, int], message: str) -> None:
    with pytest.raises(RankError, match=message):
        Layout(**layout)


def test_current_rank_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ranks.current_rank() == ranks.Rank(0, 0, 1, 1)
    for name, value in {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    me = ranks.current_rank()
    assert (me.rank, me.local_rank, me.world_size, me.host) == (5, 1, 8, 1)


def test_the_spec_splits_gpus_evenly_or_says_why_not() -> None:
    spec = ServiceSpec.model_validate({"actor": "m:A", "procs": 2, "hosts": 2, "gpusPerReplica": 8})
    assert spec.world_size == 4
    flags = spec.replica_flags()
    assert flags[flags.index("--gpus-per-rank") + 1] == "2"
    with pytest.raises(ValueError, match="gpusPerReplica must be a multiple of procs x hosts"):
        ServiceSpec.model_validate({"actor": "m:A", "procs": 2, "gpusPerReplica": 3})
    # One process with several GPUs (say vLLM's own tensor parallelism) stays as it was.
    plain = ServiceSpec.model_validate({"actor": "m:A", "gpusPerReplica": 4})
    assert "--procs" not in plain.replica_flags()


# groups in the planner -----------------------------------------------------------------------


def member(index: int, host: int, ready: bool = True, **kw: Any) -> PodView:
    name = f"s-replica-{index}" + (f"-{host}" if host else "")
    defaults: dict[str, Any] = {"phase": "Running", "ip": f"10.0.{index}.{host + 1}"}
    return PodView(name, index, kw.pop("hash_", "h1"), ready=ready, host=host, **{**defaults, **kw})


def run(desired: int, current: list[PodView], hosts: int = 2, hash_: str = "h1") -> Plan:
    return plan_of(desired, current, hash_, hosts=hosts)


def test_a_group_starts_with_its_leader_then_the_rest_at_the_leaders_ip() -> None:
    p = run(2, [])
    assert p.create == [0, 1] and p.join == []
    p = run(2, [member(0, 0, False), member(1, 0, False, ip="")])
    assert [(j.index, j.host, j.leader_ip) for j in p.join] == [(0, 1, "10.0.0.1")]
    assert p.create == [] and p.delete == []


def test_status_counts_replicas_not_pods_and_a_group_is_ready_only_whole() -> None:
    whole = [member(0, 0), member(0, 1), member(1, 0), member(1, 1, ready=False)]
    p = run(2, whole)
    assert (p.status["replicas"], p.status["readyReplicas"]) == (2, 1)
    assert [r["pod"] for r in p.status["replicaStatuses"]] == ["s-replica-0", "s-replica-1"]


@pytest.mark.parametrize(
    ("broken", "why"),
    [
        (member(1, 1, deleting=True), "s-replica-1-1 is gone"),
        (member(1, 1, phase="Failed"), "s-replica-1-1 failed"),
        (member(1, 0, deleting=True), "s-replica-1 is gone"),
    ],
)
def test_a_group_that_loses_a_pod_is_replaced_whole(broken: PodView, why: str) -> None:
    others = [p for p in (member(1, 0), member(1, 1)) if p.host != broken.host]
    p = run(2, [member(0, 0), member(0, 1), broken, *others])
    doomed = sorted(
        {"s-replica-1", "s-replica-1-1"} - ({broken.name} if broken.deleting else set())
    )
    assert sorted(p.delete) == doomed
    assert p.create == [] and p.join == []  # index 1 is held until all its pods are gone
    assert (Reason.GROUP_RESTART.value, f"replica 1: {why}; restarting its pods together") in (
        p.events
    )
    # Once they are gone, the group comes back whole: the leader first.
    assert run(2, [member(0, 0), member(0, 1)]).create == [1]


def test_pods_without_their_leader_are_removed() -> None:
    p = run(1, [member(0, 1)])
    assert p.delete == ["s-replica-0-1"] and p.create == []


def test_groups_roll_and_scale_down_whole() -> None:
    old = [member(i, h, hash_="old") for i in (0, 1) for h in (0, 1)]
    p = run(2, old, hash_="new")
    assert sorted(p.delete) == ["s-replica-1", "s-replica-1-1"]
    new = [member(i, h) for i in (0, 1, 2) for h in (0, 1)]
    p = run(1, new)
    assert sorted(p.delete) == ["s-replica-1", "s-replica-1-1", "s-replica-2", "s-replica-2-1"]


def test_single_host_replicas_plan_as_before() -> None:
    p = run(2, [member(0, 0), member(1, 0)], hosts=1)
    assert p.delete == [] and p.create == [] and p.status["readyReplicas"] == 2


# the pods of a group -------------------------------------------------------------------------


def body(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "s", "namespace": "ns", "uid": "u"},
        "spec": {"actor": "m:A", **spec},
    }


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {
        e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]
    }


def test_the_pods_of_a_group_share_a_template_and_find_rank_0() -> None:
    b = body(procs=2, hosts=2, gpusPerReplica=4)
    leader, follower = replica_pod(b, 3), replica_pod(b, 3, host=1, leader_ip="10.1.2.3")
    assert (leader["metadata"]["name"], follower["metadata"]["name"]) == (
        "s-replica-3",
        "s-replica-3-1",
    )
    assert leader["metadata"]["labels"][L_HASH] == follower["metadata"]["labels"][L_HASH]
    assert (leader["metadata"]["labels"][L_HOST], follower["metadata"]["labels"][L_HOST]) == (
        "0",
        "1",
    )
    assert env_of(leader)["MASTER_ADDR"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env_of(follower)["MASTER_ADDR"] == "10.1.2.3"
    assert (env_of(leader)["KUBEFORGE_HOST_INDEX"], env_of(follower)["KUBEFORGE_HOST_INDEX"]) == (
        "0",
        "1",
    )
    lead, follow = leader["spec"]["containers"][0], follower["spec"]["containers"][0]
    assert "readinessProbe" in lead and "readinessProbe" not in follow and "ports" not in follow
    assert lead["resources"]["limits"][GPU] == follow["resources"]["limits"][GPU] == 2
    assert lead["args"][lead["args"].index("--procs") + 1] == "2"


def test_single_rank_pods_are_unchanged_by_spmd() -> None:
    pod = replica_pod(body(gpusPerReplica=2), 0)
    assert L_HOST not in pod["metadata"]["labels"]
    assert (
        "MASTER_ADDR" not in env_of(pod) and "--procs" not in pod["spec"]["containers"][0]["args"]
    )
