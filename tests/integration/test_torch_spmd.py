"""SPMD replicas on real torch.distributed (gloo): the ranks of a `procs=2` replica form one
process group from the environment kubeforge sets, every call's collective completes, and a
rank killed mid-collective brings the replica back with a fresh group."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from collections.abc import AsyncIterator

import pytest
import torch

from examples.collectives import Collectives
from kubeforge import KubeforgeError, Service, ServiceConfig
from tests.integration.procs import pid_alive

pytestmark = pytest.mark.timeout(180)

REJOIN_BOUND = 30.0  # seconds from kill -9 of a rank to a replica whose new group answers


@pytest.fixture
async def collectives() -> AsyncIterator[Service]:
    cfg = ServiceConfig(num_replicas=2, procs=2, return_first_rank_result=False)
    async with Service(cfg, Collectives, timeout_s=20.0) as svc:
        yield svc


async def test_each_replica_is_one_gloo_group_and_every_collective_completes(
    collectives: Service,
) -> None:
    infos = await collectives.info.fanout()  # per replica, per rank
    for ranks in infos:
        assert [(r["rank"], r["world_size"], r["backend"]) for r in ranks] == [
            (0, 2, "gloo"),
            (1, 2, "gloo"),
        ]
        assert len({r["master"] for r in ranks}) == 1  # one rendezvous per replica
    assert infos[0][0]["master"] != infos[1][0]["master"]  # and one group each
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    took = []
    for _ in range(20):
        started = time.perf_counter()
        reduced = await collectives.all_reduce.route(t)
        took.append(time.perf_counter() - started)
        assert [torch.equal(x, t * 3) for x in reduced] == [True, True]  # 1x + 2x, on each rank
    gathered = await collectives.all_gather.route(t.to(torch.float64))
    for rank_view in gathered:
        assert [x.dtype for x in rank_view] == [torch.float64] * 2
        assert torch.equal(rank_view[0], t.double()) and torch.equal(rank_view[1], t.double() + 1)
    both = await collectives.all_reduce.fanout(torch.ones(1000))
    assert [[float(x.sum()) for x in ranks] for ranks in both] == [[3000.0, 3000.0]] * 2
    print(
        f"all_reduce of 6 floats through the Service: p50 {statistics.median(took) * 1e3:.1f} ms, "
        f"max {max(took) * 1e3:.1f} ms; groups formed in "
        f"{max(r['formed_in_s'] for ranks in infos for r in ranks):.2f} s"
    )


async def test_kill9_of_a_rank_mid_collective_forms_a_fresh_group(collectives: Service) -> None:
    sid = await collectives.start_session()  # the replica whose rank is killed
    before = await collectives.info(sid)
    victim = before[1]["pid"]
    # Rank 0 waits inside all_reduce for rank 1, which is killed before it joins.
    pending = asyncio.ensure_future(collectives.late_all_reduce(sid, torch.ones(3), 1, 5.0))
    await asyncio.sleep(1.0)
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(KubeforgeError):
        await pending  # the call in flight fails: its collective cannot complete
    left = time.monotonic() - killed
    while collectives.get_metrics_summary()["service"]["healthy_replicas"] != 2:
        assert time.monotonic() - killed < REJOIN_BOUND, "the replica did not come back"
        await asyncio.sleep(0.1)
    # The new ranks formed a new group: collectives complete on both replicas again.
    both = await collectives.all_reduce.fanout(torch.ones(2))
    back = time.monotonic() - killed
    assert [[x.tolist() for x in ranks] for ranks in both] == [[[3.0, 3.0]] * 2] * 2
    after = [ranks for ranks in await collectives.info.fanout()]
    pids = {r["pid"] for ranks in after for r in ranks}
    assert {r["pid"] for r in before}.isdisjoint(pids)
    assert not [r["pid"] for r in before if pid_alive(r["pid"])]  # no orphaned rank
    assert back < REJOIN_BOUND
    print(
        f"rank 1 killed mid-collective: the call failed after {left:.2f}s, a fresh group "
        f"answered after {back:.2f}s"
    )
