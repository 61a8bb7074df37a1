"""SPMD replicas (torchforge's `procs`): rank processes that rendezvous, run every call in one
order, answer with rank 0's result (or all), and restart together. Real processes, no torch."""

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from examples.spmd import RankCounter
from kubeforge import RemoteError, Service, ServiceConfig
from kubeforge.local import free_ports
from kubeforge.replica import gang as gang_frames
from kubeforge.settings import DEFAULTS
from tests.integration.conftest import call
from tests.integration.procs import REPO, Procs, descendants, free_port, http_get, pid_alive
from tests.integration.test_cli import start_run

ACTOR = "examples.spmd:RankCounter"


@pytest.fixture
async def spmd() -> AsyncIterator[Service]:
    cfg = ServiceConfig(num_replicas=2, procs=2, replica_max_concurrent_requests=8)
    async with Service(cfg, RankCounter) as svc:
        yield svc


def ranks_of(svc: Service) -> list[list[dict[str, Any]]]:
    """Each replica's ranks as its rank 0 reports them on /healthz."""
    out = []
    for url in svc._replicas.urls:
        status, health = http_get(url + "/healthz")
        assert status == 200, health
        out.append(health["ranks"])  # type: ignore[index]
    return out


async def test_ranks_get_the_env_rendezvous_and_every_rank_runs_each_call() -> None:
    cfg = ServiceConfig(num_replicas=2, procs=2, return_first_rank_result=False)
    async with Service(cfg, RankCounter) as svc:
        envs = await svc.env.fanout()  # per replica, per rank
        assert [[e["rank"] for e in replica] for replica in envs] == [["0", "1"], ["0", "1"]]
        for replica in envs:
            assert {e["world_size"] for e in replica} == {"2"}
            assert {e["local_world_size"] for e in replica} == {"2"}
            assert [e["local_rank"] for e in replica] == ["0", "1"]
            assert {e["master_addr"] for e in replica} == {"127.0.0.1"}
            assert len({e["master_port"] for e in replica}) == 1  # one rendezvous per replica
        assert envs[0][0]["master_port"] != envs[1][0]["master_port"]
        assert len({e["pid"] for replica in envs for e in replica}) == 4
        # A collective through the ranks' own store: it completes only if both ranks run it.
        sid = await svc.start_session()
        gathered = [{"rank": 0, "tag": "a"}, {"rank": 1, "tag": "a"}]
        assert await svc.gather(sid, "a") == [gathered, gathered]  # as each rank saw it
        # Every rank's counter advances once per call; all ranks' values, in rank order.
        for n in range(1, 4):
            assert await svc.incr(sid) == [{"rank": 0, "calls": n}, {"rank": 1, "calls": n}]


async def test_a_call_returns_rank_0s_value_and_every_rank_counts_it(spmd: Service) -> None:
    sid = await spmd.start_session()
    for n in range(1, 6):
        assert await spmd.incr(sid) == {"rank": 0, "calls": n}
    spmd.return_first_rank_result = False  # what ServiceConfig(return_first_rank_result=False) sets
    assert await spmd.incr(sid) == [{"rank": 0, "calls": 6}, {"rank": 1, "calls": 6}]


async def test_concurrent_calls_reach_every_rank_in_one_order(spmd: Service) -> None:
    """8 calls admitted at once per replica, 80 in all: each call's all-gather meets the same
    call on the other rank, which holds only if both ranks ran the calls in one order."""
    tags = [f"t{i}" for i in range(80)]
    results = await asyncio.gather(*(spmd.gather.route(tag) for tag in tags))
    for tag, gathered in zip(tags, results, strict=True):
        assert gathered == [{"rank": 0, "tag": tag}, {"rank": 1, "tag": tag}]
    # ... and one at a time on each rank, however many were admitted at once.
    spmd.return_first_rank_result = False
    assert await spmd.overlap.fanout() == [[1, 1], [1, 1]]
    spmd.return_first_rank_result = True
    # Broadcasts take their place in the same order on every rank of every replica.
    fan = await asyncio.gather(*(spmd.gather.fanout(f"f{i}") for i in range(10)))
    for i, per_replica in enumerate(fan):
        assert per_replica == [[{"rank": 0, "tag": f"f{i}"}, {"rank": 1, "tag": f"f{i}"}]] * 2


async def test_an_error_on_any_rank_raises_naming_the_rank(spmd: Service) -> None:
    with pytest.raises(RemoteError) as err:
        await spmd.fail_on.route(1)
    assert err.value.remote_type == "ValueError"
    assert "rank 1 of 2: rank 1 was asked to fail" in str(err.value)
    with pytest.raises(RemoteError, match="rank 0 of 2"):
        await spmd.fail_on.route(0)
    assert await spmd.fail_on.route(5) == 0  # no rank failed: rank 0's value
    assert await spmd.gather.route("after") == [
        {"rank": 0, "tag": "after"},
        {"rank": 1, "tag": "after"},
    ]


async def test_kill9_of_rank_1_restarts_the_replica_as_a_unit(spmd: Service) -> None:
    before = ranks_of(spmd)
    victim = before[0][1]["pid"]
    sids = [await spmd.start_session() for _ in range(4)]
    holders = {sid: (await spmd.env(sid))["pid"] for sid in sids}
    doomed = [sid for sid, pid in holders.items() if pid == before[0][0]["pid"]]
    assert len(doomed) == 2
    failures: list[BaseException] = []
    calls = 0
    stop = asyncio.Event()

    async def sessionless_load() -> None:
        nonlocal calls
        while not stop.is_set():
            try:
                assert len(await spmd.gather.route("load")) == 2
                calls += 1
            except Exception as exc:
                failures.append(exc)

    load = [asyncio.create_task(sessionless_load()) for _ in range(4)]
    await asyncio.sleep(0.3)
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    # The whole replica leaves rotation at once: rank 0 exits with its peer.
    while spmd.get_metrics_summary()["service"]["healthy_replicas"] != 1:
        assert time.monotonic() - killed < 0.2 + 0.5, "replica still counted healthy"
        await asyncio.sleep(0.01)
    # Sessions of the lost replica are re-pinned, as for any lost replica.
    for sid in doomed:
        assert (await spmd.env(sid))["pid"] != holders[sid]
    # The launcher starts both ranks again; the replica rejoins.
    while spmd.get_metrics_summary()["service"]["healthy_replicas"] != 2:
        assert time.monotonic() - killed < 15, "replica did not come back"
        await asyncio.sleep(0.05)
    rejoined = time.monotonic() - killed
    stop.set()
    await asyncio.gather(*load)
    assert not failures, failures[:3]
    assert calls > 20
    after = ranks_of(spmd)
    assert {r["pid"] for r in after[0]}.isdisjoint({r["pid"] for r in before[0]})
    assert [r["pid"] for r in after[1]] == [r["pid"] for r in before[1]]  # the other kept its
    assert not [r["pid"] for r in before[0] if pid_alive(r["pid"])]  # no orphaned rank
    print(f"rank 1 killed: out of rotation at once, rejoined after {rejoined:.2f}s, {calls} calls")


async def test_a_rank_that_stops_answering_takes_its_replica_out_of_rotation() -> None:
    cfg = ServiceConfig(num_replicas=2, procs=2, health_poll_rate=0.2)
    async with Service(cfg, RankCounter) as svc:
        sid = await svc.start_session()
        stalled = svc._replicas.urls.index(
            next(u for u in svc._replicas.urls if http_get(u + "/healthz")[1]["sessions"] == 1)
        )
        stall = asyncio.create_task(svc.stall(sid, 1, DEFAULTS.rank_silence + 2))
        started = time.monotonic()
        while svc.get_metrics_summary()["service"]["healthy_replicas"] != 1:
            assert time.monotonic() - started < DEFAULTS.rank_silence + 1.5, "still in rotation"
            await asyncio.sleep(0.05)
        left = time.monotonic() - started
        assert (await svc.gather.route("meanwhile"))[0]["tag"] == "meanwhile"  # the other one
        assert await stall is None
        while svc.get_metrics_summary()["service"]["healthy_replicas"] != 2:
            assert time.monotonic() - started < DEFAULTS.rank_silence + 6, "did not come back"
            await asyncio.sleep(0.05)
        _, health = http_get(svc._replicas.urls[stalled] + "/healthz")
        assert health["ready"] is True and health["instance"]  # the same ranks, answering again
    print(f"a silent rank took its replica out of rotation after {left:.1f}s")


async def test_no_rank_outlives_its_launcher_or_the_service() -> None:
    svc = await Service(ServiceConfig(num_replicas=2, procs=3), RankCounter).start()
    try:
        ranks = ranks_of(svc)
        assert [len(r) for r in ranks] == [3, 3]
        launcher = svc.pids[0]
        assert {r["pid"] for r in ranks[0]} == descendants(launcher)
        os.kill(launcher, signal.SIGKILL)  # its ranks must not be orphaned
        deadline = time.monotonic() + 5
        while [r for r in ranks[0] if pid_alive(r["pid"])]:
            assert time.monotonic() < deadline, "ranks outlived their launcher"
            await asyncio.sleep(0.05)
    finally:
        await svc.stop()
    assert not [r["pid"] for replica in ranks for r in replica if pid_alive(r["pid"])]
    assert not descendants(os.getpid())


async def test_a_rank_whose_setup_fails_fails_the_start_with_its_reason() -> None:
    cfg = ServiceConfig(num_replicas=1, procs=2, startup_timeout=30)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code 85"):
        await Service(cfg, RankCounter, fail_setup_on=1).start()
    assert time.monotonic() - started < 10  # said at once, not at the start-up timeout
    assert not descendants(os.getpid())


def test_hosts_above_one_stay_a_clear_error_locally() -> None:
    with pytest.raises(ValueError, match="a local Service runs on one host"):
        ServiceConfig(num_replicas=1, procs=2, hosts=2)


async def test_kubeforge_run_serves_procs_and_refuses_hosts(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    port = free_port()
    proc, out = await loop.run_in_executor(None, start_run, "examples/spmd.yaml", port)
    try:
        assert "is serving at" in out, out
        status, body = http_get(f"http://127.0.0.1:{port}/v1/replicas")
        assert status == 200, body
        assert len(descendants(proc.pid)) == 1 + 2 * 3  # router, and 2 launchers x 2 ranks
    finally:
        proc.send_signal(signal.SIGINT)
        await loop.run_in_executor(None, proc.wait, 20)
    assert not descendants(proc.pid)
    spec = tmp_path / "hosts.yaml"
    spec.write_text(
        (REPO / "examples/spmd.yaml").read_text().replace("procs: 2", "procs: 2\n  hosts: 2")
    )
    proc, out = await loop.run_in_executor(None, start_run, str(spec), free_port())
    assert proc.wait(10) == 2
    assert "spec.hosts is 2: a local run has one host" in out


async def test_rank_0_admits_only_its_own_ranks(procs: Procs) -> None:
    """The gang port takes ranks that hold the replica's token and run its actor in its world;
    anyone else is refused with the reason, and the replica keeps serving."""
    gang, master = free_ports(2)
    replica = procs.replica(
        ACTOR,
        "--procs",
        "2",
        "--master-port",
        str(master),
        "--gang-port",
        str(gang),
        env={"KUBEFORGE_TOKEN": "s3cret"},
    )
    hello = {"t": "hello", "rank": 1, "world_size": 2, "actor": ACTOR, "token": "s3cret"}
    for wrong, reason in [
        ({"token": "guess"}, "wrong token"),
        ({"world_size": 4}, "in a world of 4"),
        ({"rank": 1}, "already here or the replica is formed"),
        ({"t": "call"}, "expected a hello"),
    ]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gang)
        writer.write(gang_frames.pack({**hello, **wrong}))
        answer = await gang_frames.read(reader, 4096)
        writer.close()
        assert answer["t"] == "refused" and reason in answer["reason"], answer
    status, body = http_get(replica.url + "/healthz")
    assert status == 200 and body["ready"] and len(body["ranks"]) == 2, body
    headers = {"Authorization": "Bearer s3cret"}
    async with aiohttp.ClientSession(headers=headers) as http:
        status, body, _ = await call(http, replica.url, "gather", "still")
    assert status == 200 and body["result"] == [
        {"rank": 0, "tag": "still"},
        {"rank": 1, "tag": "still"},
    ]
