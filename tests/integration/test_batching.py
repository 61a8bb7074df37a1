"""Batched endpoints (`@endpoint(batch_size=N, batch_wait=S)`) end to end: a local `Service`
and `ServiceClient` through a router process over a replica process. Concurrent calls on one
replica become one call of the method; each caller gets its own result or its own error. The
tier runs on both call paths (native relay and Python)."""

from __future__ import annotations

import asyncio
import inspect
import urllib.request
from collections.abc import AsyncIterator, Iterator

import pytest

from examples.batched import Scorer
from kubeforge import RemoteError, Service, ServiceClient, ServiceConfig
from kubeforge.errors import InvalidArgumentsError
from kubeforge.local import LocalDeployment
from kubeforge.service_api import ServiceAPI
from tests.integration.procs import deployed

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def routed() -> Iterator[LocalDeployment]:
    with deployed("examples.batched:Scorer", 1) as dep:
        yield dep


@pytest.fixture(params=["local", "router"])
async def svc(request: pytest.FixtureRequest) -> AsyncIterator[ServiceAPI]:
    if request.param == "local":
        async with Service(ServiceConfig(num_replicas=1), Scorer) as local:
            yield local
    else:
        dep: LocalDeployment = request.getfixturevalue("routed")
        async with ServiceClient(dep.url) as client:
            yield client


async def _new_batches(svc: ServiceAPI, before: int) -> list[int]:
    return (await svc.batch_sizes.route())[before:]


async def test_concurrent_calls_become_batches_and_each_caller_gets_its_result(
    svc: ServiceAPI,
) -> None:
    before = len(await svc.batch_sizes.route())
    texts = ["x" * i for i in range(48)]
    results = await asyncio.gather(*(svc.score.route(t) for t in texts))
    assert results == [float(len(t)) for t in texts]  # each its own, in its caller's place
    batches = await _new_batches(svc, before)
    assert sum(batches) == 48 and max(batches) <= 16
    assert len(batches) <= 12, batches  # grouped: 48 calls alone would be 48 batches
    print(f"48 concurrent calls ran as {len(batches)} batches: {batches}")


async def test_a_result_that_is_an_exception_fails_only_its_caller(svc: ServiceAPI) -> None:
    got = await asyncio.gather(*(svc.checked.route(x) for x in (1, -2, 3)), return_exceptions=True)
    assert got[0] == 10 and got[2] == 30
    assert isinstance(got[1], RemoteError) and "-2 is negative" in str(got[1])


async def test_a_batch_with_the_wrong_number_of_results_fails_every_caller_saying_so(
    svc: ServiceAPI,
) -> None:
    got = await asyncio.gather(*(svc.short.route(x) for x in range(3)), return_exceptions=True)
    assert all(isinstance(g, RemoteError) for g in got), got
    assert "must return a list of one result per call" in str(got[0])


async def test_arguments_are_checked_per_call_and_passed_any_way_in_one_batch(
    svc: ServiceAPI,
) -> None:
    with pytest.raises(InvalidArgumentsError, match="argument 'texts' of score must be str"):
        await svc.score.route(5)
    # Positionally, by name, mixed: one batch of lists all the same.
    got = await asyncio.gather(
        svc.doubled.route(1, 2), svc.doubled.route(xs=3, by=4), svc.doubled.route(5, by=6)
    )
    assert got == [2, 12, 30]


async def test_calls_in_sessions_join_batches_like_any_other(svc: ServiceAPI) -> None:
    before = len(await svc.batch_sizes.route())
    async with svc.session() as one, svc.session() as two:
        calls = [svc.score.route("a", sess_id=one), svc.score.route("bb", sess_id=two)]
        calls += [svc.score.route("ccc") for _ in range(6)]
        assert await asyncio.gather(*calls) == [1.0, 2.0] + [3.0] * 6
    assert sum(await _new_batches(svc, before)) == 8
    assert len(await _new_batches(svc, before)) <= 3


async def test_metrics_report_batch_sizes(routed: LocalDeployment) -> None:
    async with ServiceClient(routed.url) as client:
        await asyncio.gather(*(client.score.route("m") for _ in range(16)))
    replica = routed.replica_set.urls[0]
    text = urllib.request.urlopen(replica + "/metrics", timeout=5).read().decode()
    count = next(
        line
        for line in text.splitlines()
        if line.startswith('kubeforge_replica_batch_size_count{endpoint="score"}')
    )
    total = next(
        line
        for line in text.splitlines()
        if line.startswith('kubeforge_replica_batch_size_sum{endpoint="score"}')
    )
    batches, calls = float(count.split()[-1]), float(total.split()[-1])
    assert calls >= 16 and batches < calls, (batches, calls)


async def test_the_metrics_summary_reports_batch_sizes(svc: ServiceAPI) -> None:
    """get_metrics_summary() (and get_metrics()) carry each replica's batch counts, as its
    health answer reports them, and the service's totals."""

    async def score_batches() -> dict[str, float]:
        summary = svc.get_metrics_summary()
        summary = await summary if inspect.isawaitable(summary) else summary
        return summary["replicas"][0]["batches"].get("score", {"calls": 0})

    before = (await score_batches())["calls"]
    await asyncio.gather(*(svc.score.route("m") for _ in range(32)))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while (now := await score_batches())["calls"] < before + 32:  # the next health poll
        assert loop.time() < deadline, now
        await asyncio.sleep(0.05)
    assert 1 < now["avg_batch_size"] <= now["largest"] <= 16, now
    assert now["batches"] * now["avg_batch_size"] == pytest.approx(now["calls"])
    metrics = svc.get_metrics()
    metrics = await metrics if inspect.isawaitable(metrics) else metrics
    assert metrics.replica_metrics[0].get_avg_batch_size("score") > 1
    assert metrics.summary["service"]["batches"]["score"]["calls"] >= now["calls"]
