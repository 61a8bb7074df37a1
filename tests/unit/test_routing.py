from collections import Counter

import pytest

from kubeforge.errors import BadRequestError, NoHealthyReplicasError, UnknownSessionError
from kubeforge.metrics import SlidingWindow
from kubeforge.router.core import Replica, ReplicaState, RoutingTable
from kubeforge.router.sessions import SessionCodec, check_name


def _health(
    instance: str, in_flight: int = 0, queued: int = 0, sessions: int = 0, ready: bool = True
) -> dict[str, object]:
    return {
        "instance": instance,
        "in_flight": in_flight,
        "queued": queued,
        "sessions": sessions,
        "ready": ready,
        "max_concurrent_requests": 10,
    }


def table_with(n: int, key: str = "k") -> RoutingTable:
    t = RoutingTable(SessionCodec(key))
    for i in range(n):
        r = Replica(i, f"replica-{i}", f"http://127.0.0.1:{9000 + i}", SlidingWindow(0.0))
        t.add(r)
        t.report(r, _health(f"inst{i}"))
    return t


def test_ties_are_shared_round_robin_not_first_wins() -> None:
    t = table_with(3)
    picks = Counter(t.pick().index for _ in range(300))
    assert picks == {0: 100, 1: 100, 2: 100}


def test_least_loaded_wins() -> None:
    t = table_with(3)
    t.replicas[0].in_flight = 5
    t.replicas[1].in_flight = 1
    t.replicas[2].in_flight = 3
    assert {t.pick().index for _ in range(10)} == {1}


def test_reported_load_of_other_callers_counts() -> None:
    t = table_with(2)
    t.report(t.replicas[0], _health("inst0", in_flight=4, queued=3))
    assert t.replicas[0].load == 7
    assert t.pick().index == 1


def test_idle_sessions_spread_evenly() -> None:
    t = table_with(3)
    placed = Counter(t.new_session().replica.index for _ in range(30))
    assert placed == {0: 10, 1: 10, 2: 10}


def test_sessions_stick_and_adding_a_replica_moves_none() -> None:
    t = table_with(2)
    sids = [t.new_session().session_id for _ in range(6)]
    before = {s: t.place(s).replica.index for s in sids}
    extra = Replica(2, "replica-2", "http://127.0.0.1:9002", SlidingWindow(0.0))
    t.add(extra)
    t.report(extra, _health("inst2"))
    assert {s: t.place(s).replica.index for s in sids} == before


def test_lost_replica_sessions_are_repinned_across_survivors_not_piled_on_one() -> None:
    t = table_with(3)
    sids = [t.new_session().session_id for _ in range(12)]
    on_zero = [s for s in sids if t.place(s).replica.index == 0]
    assert len(on_zero) == 4
    t.connection_failed(t.replicas[0], "connection refused")
    moved = [t.place(s) for s in on_zero]
    assert all(p.moved_from == 0 and p.fresh for p in moved)
    assert Counter(p.replica.index for p in moved) == {1: 2, 2: 2}
    assert t.sessions_moved == 4
    # Later calls with the old id go where the move put it, without moving again.
    again = t.place(on_zero[0])
    assert again.replica is moved[0].replica and not again.fresh
    assert again.session_id == moved[0].session_id


def test_restarted_replica_instance_orphans_its_sessions() -> None:
    t = table_with(2)
    p = t.new_session()
    while p.replica.index != 0:
        p = t.new_session()
    t.report(t.replicas[0], _health("new-instance"))
    assert t.place(p.session_id).moved_from == 0


def test_forged_or_garbled_session_ids_are_unknown() -> None:
    t = table_with(1)
    sid = t.new_session().session_id
    with pytest.raises(UnknownSessionError):
        t.place(sid[:-1] + ("0" if sid[-1] != "0" else "1"))
    with pytest.raises(UnknownSessionError):
        t.place("not-a-session")
    other = table_with(1, key="another-token")
    with pytest.raises(UnknownSessionError):
        other.place(sid)


def test_two_routers_with_the_same_key_agree_on_a_session() -> None:
    a, b = table_with(3), table_with(3)
    sid = a.new_session().session_id
    assert b.place(sid).replica.index == a.place(sid).replica.index


def test_state_machine() -> None:
    t = table_with(1)
    r = t.replicas[0]
    assert r.state is ReplicaState.HEALTHY
    t.report(r, None, "connection refused")
    assert r.state is ReplicaState.UNHEALTHY and t.healthy == []
    t.report(r, _health("inst0"))
    assert r.state is ReplicaState.HEALTHY
    t.report(r, {**_health("inst0", ready=False), "draining": True})
    assert r.state is ReplicaState.UNHEALTHY and r.reason == "draining"
    t.remove(0)
    assert r.state is ReplicaState.STOPPED


def test_starting_replica_gets_no_traffic() -> None:
    t = RoutingTable(SessionCodec(None))
    r = Replica(0, "replica-0", "http://x:1", SlidingWindow(0.0))
    t.add(r)
    t.report(r, _health("i", ready=False))
    assert r.state is ReplicaState.STARTING
    with pytest.raises(NoHealthyReplicasError, match="STARTING"):
        t.pick()


def test_one_slow_health_poll_is_forgiven_a_second_is_not() -> None:
    t = table_with(1)
    r = t.replicas[0]
    t.report(r, None, "health check timed out", timed_out=True)
    assert r.state is ReplicaState.HEALTHY  # a busy machine, not a dead replica
    t.report(r, _health("inst0"))
    t.report(r, None, "health check timed out", timed_out=True)
    assert r.state is ReplicaState.HEALTHY  # the answer in between reset the count
    t.report(r, None, "health check timed out", timed_out=True)
    assert r.state is ReplicaState.UNHEALTHY and "timed out" in r.reason
    t.report(r, None, "health check timed out", timed_out=True)  # not HEALTHY: no grace
    assert r.state is ReplicaState.UNHEALTHY


def test_exclude_and_no_healthy_left() -> None:
    t = table_with(2)
    assert t.pick(frozenset({0})).index == 1
    with pytest.raises(NoHealthyReplicasError):
        t.pick(frozenset({0, 1}))


def test_a_name_is_placed_by_fewest_sessions_and_moves_only_when_its_replica_is_gone() -> None:
    t = table_with(2)
    first = t.place_named("sess1")
    second = t.place_named("sess2")
    assert {first.replica.index, second.replica.index} == {0, 1}
    assert first.fresh and first.moved_from is None and first.session_id == "sess1"
    assert t.named_replica("sess1") is first.replica
    t.report(first.replica, _health("restarted"))  # its sessions died with the old process
    assert t.named_replica("sess1") is None  # the engine asks the replicas, then places anew
    moved = t.place_named("sess1")
    assert moved.moved_from == first.replica.index and moved.session_id == "sess1"
    t.forget("sess1")
    assert t.named_replica("sess1") is None and t.place_named("sess1").moved_from is None


@pytest.mark.parametrize("name", ["sess1", "episode/17 of run 7%", "0.abc.1.2", "x" * 256])
def test_any_printable_ascii_name_is_a_session_name(name: str) -> None:
    codec = SessionCodec("k")
    check_name(name)
    assert not codec.issued_form(name)
    assert codec.issued_form(codec.new(0, "inst"))


@pytest.mark.parametrize("name", ["", "x" * 257, "épisode", "tab\there", " padded", "padded "])
def test_a_name_that_cannot_travel_in_a_header_is_refused(name: str) -> None:
    with pytest.raises(BadRequestError, match="session id"):
        check_name(name)
