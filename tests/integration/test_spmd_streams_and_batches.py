"""Streaming and batched endpoints on SPMD replicas, with real torch.distributed (gloo): a
stream's every item is a collective taken on every rank at once, a caller that leaves stops
every rank at the same item, a call made meanwhile waits its turn instead of meeting the
stream's collectives out of order, and a batch runs on every rank with the same lists."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import torch

from examples.collectives import Collectives
from kubeforge import RemoteError, Service, ServiceClient, ServiceConfig
from tests.integration.procs import deployed

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def spmd() -> AsyncIterator[Service]:
    cfg = ServiceConfig(num_replicas=1, procs=2, return_first_rank_result=False)
    async with Service(cfg, Collectives, timeout_s=20.0) as svc:
        yield svc


async def test_a_stream_steps_every_rank_through_each_collective(spmd: Service) -> None:
    t = torch.arange(4, dtype=torch.float32)
    items = [x async for x in spmd.running_sums.stream(t, 5)]
    assert [x.tolist() for x in items] == [(t * 3 + i).tolist() for i in range(5)]
    assert await spmd.stream_log.route() == [[0, 1, 2, 3, 4, "closed"]] * 2


async def test_a_caller_that_leaves_stops_every_rank_at_the_same_item(spmd: Service) -> None:
    t = torch.ones(2)
    got = []
    async for x in spmd.running_sums.stream(t, 100_000):
        got.append(x)
        if len(got) == 3:
            break
    # The replica's order moves on: the next collective meets on both ranks.
    reduced = await asyncio.wait_for(spmd.all_reduce.route(t), 30)
    assert [x.tolist() for x in reduced] == [[3.0, 3.0]] * 2
    logs = await spmd.stream_log.route()
    assert logs[0] == logs[1], logs  # the same items on both ranks, then closed
    assert logs[0][-1] == "closed" and 3 <= len(logs[0]) - 1 < 100_000
    print(f"the caller left after 3 items; both ranks closed after item {logs[0][-2]}")


async def test_an_error_on_another_rank_ends_the_stream_after_the_items_sent(
    spmd: Service,
) -> None:
    t = torch.ones(3)
    got = []
    with pytest.raises(RemoteError, match="rank 1 of 2: rank 1 fails at item 2"):
        async for x in spmd.running_sums.stream(t, 10, fail_rank=1, fail_at=2):
            got.append(x.tolist())
    assert got == [[3.0] * 3, [4.0] * 3]
    logs = await spmd.stream_log.route()
    # Rank 0 made item 2, which was never sent; rank 1 raised in its place; both closed.
    assert logs == [[0, 1, 2, "closed"], [0, 1, "closed"]]
    assert len(await spmd.all_gather.route(t)) == 2  # and the replica takes calls again


async def test_calls_made_during_a_stream_wait_for_it_to_end(spmd: Service) -> None:
    """Without the stream holding the order, the all_reduce would meet the stream's
    collectives on one rank and hang (or sum the wrong tensors)."""
    t = torch.ones(2)
    items: list[list[float]] = []

    async def read_slowly() -> None:
        async for x in spmd.running_sums.stream(t, 8):
            items.append(x.tolist())
            await asyncio.sleep(0.05)

    reader = asyncio.ensure_future(read_slowly())
    await asyncio.sleep(0.1)
    calls = [spmd.all_reduce.route(torch.full((2,), 10.0)) for _ in range(3)]
    reduced = await asyncio.wait_for(asyncio.gather(*calls), 60)
    await reader
    assert items == [[3.0 + i] * 2 for i in range(8)]
    assert [[x.tolist() for x in r] for r in reduced] == [[[30.0, 30.0]] * 2] * 3


async def test_batches_run_on_every_rank_with_the_same_lists(spmd: Service) -> None:
    tensors = [torch.full((3,), float(i)) for i in range(16)]
    results = await asyncio.gather(*(spmd.reduce_each.route(t) for t in tensors))
    for t, per_rank in zip(tensors, results, strict=True):
        assert [x.tolist() for x in per_rank] == [(t * 3).tolist()] * 2  # its own, every rank
    logs = await spmd.batch_log.route()
    assert logs[0] == logs[1] and sum(logs[0]) == 16 and len(logs[0]) < 16, logs
    summary = spmd.get_metrics_summary()
    while summary["replicas"][0]["batches"].get("reduce_each", {}).get("calls", 0) < 16:
        await asyncio.sleep(0.05)  # the next health poll brings the counts
        summary = spmd.get_metrics_summary()


async def test_streams_and_batches_of_an_spmd_replica_through_a_router() -> None:
    with deployed("examples.collectives:Collectives", 1, "--procs", "2") as dep:
        async with ServiceClient(dep.url) as client:
            t = torch.ones(2)
            items = [x.tolist() async for x in client.running_sums.stream(t, 4)]
            assert items == [[3.0 + i] * 2 for i in range(4)]
            got = await asyncio.gather(*(client.reduce_each.route(t * i) for i in range(8)))
            assert [x.tolist() for x in got] == [[3.0 * i] * 2 for i in range(8)]
