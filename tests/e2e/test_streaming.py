"""Streaming and batched endpoints on Kubernetes: a generator's items through the Service's
router pod, as frames for Python callers and as Server-Sent Events for curl; a caller that
leaves cancels the generator in its replica pod; `streamIdleTimeout` from the resource reaches
the replicas; a batched endpoint under 64 concurrent callers. On the process node and on kind
alike."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from kubeforge import RequestTimeoutError, ServiceClient
from tests.e2e.conftest import Operator
from tests.e2e.test_operator import _eq, _token, _until, deploy, router_url
from tests.e2e.test_spmd import _states

pytestmark = pytest.mark.timeout(240)


async def test_a_stream_through_the_router_pod(
    cluster: Any, namespace: str, operator: Operator
) -> None:
    deploy(
        cluster,
        namespace,
        "tokens",
        2,
        gpus=0,
        actor="examples.tokens:Tokens",
        streamIdleTimeout="1s",
        healthPollRate="200ms",
    )
    url, token = router_url(cluster, namespace, "tokens"), _token(cluster, namespace, "tokens")
    async with ServiceClient(url, token=token) as client:
        await _until(lambda: _eq(_states(client), ["HEALTHY"] * 2), 30, "2 healthy replicas")
        started = time.monotonic()
        arrivals = []
        async for tok in client.generate.stream("hi", 4, 0.2):
            arrivals.append((time.monotonic() - started, tok))
        assert [t for _, t in arrivals] == [f"hi-{i}" for i in range(4)]
        assert arrivals[0][0] < arrivals[-1][0] - 0.4, arrivals  # as yielded, not at the end
        async with client.session() as sid:
            items = [i async for i in client.watched.stream(3, 0.0)]
            assert {i["session"] for i in items} == {sid}
        # The resource's streamIdleTimeout (1s), not the default (30s), ends a stalled stream.
        with pytest.raises(RequestTimeoutError, match="no item for 1s"):
            async for _ in client.paced.stream([0, 3]):
                pass
        # Leaving early cancels the generator in its pod.
        stream = client.watched.stream(10_000, 0.01)
        async for item in stream:
            if item["i"] == 3:
                break
        await stream.aclose()

        async def closed() -> bool:
            return sum(len(c) for c in await client.closed_streams.fanout()) == 1

        await _until(closed, 5, "the generator was closed")
        print(f"stream of 4 items through the router pod: first after {arrivals[0][0]:.2f}s")
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            url + "/v1/stream/generate",
            json={"args": ["sse"], "kwargs": {"n": 2}},
            headers={"Accept": "text/event-stream", "Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        assert resp.status == 200 and resp.headers["content-type"] == "text/event-stream"
        body = (await resp.read()).decode()
    assert body == 'data: "sse-0"\n\ndata: "sse-1"\n\nevent: end\ndata: {}\n\n'


async def test_a_batched_endpoint_under_load_through_the_router_pod(
    cluster: Any, namespace: str, operator: Operator
) -> None:
    deploy(cluster, namespace, "scorer", 1, gpus=0, actor="examples.batched:Scorer")
    url, token = router_url(cluster, namespace, "scorer"), _token(cluster, namespace, "scorer")
    async with ServiceClient(url, token=token) as client:
        await _until(lambda: _eq(_states(client), ["HEALTHY"]), 30, "the replica is healthy")
        started = time.monotonic()
        for _ in range(5):  # 64 callers at once, five times over
            texts = [f"t{i}" * (i % 7) for i in range(64)]
            assert await asyncio.gather(*(client.score.route(t) for t in texts)) == [
                float(len(t)) for t in texts
            ]
        took = time.monotonic() - started
        batches = await client.batch_sizes.route()
    assert sum(batches) == 320 and max(batches) <= 16
    assert len(batches) < 320 / 4, batches  # grouped, on average more than 4 calls a batch
    print(f"320 calls through the router pod in {took:.2f}s as {len(batches)} batches")
