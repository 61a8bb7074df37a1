"""Large bodies stream through the router process: it never holds one whole (issue 21, point
3). Measured as the router's peak RSS growth (VmHWM) during the call, on both call paths (the
tier runs again with KUBEFORGE_RELAY=python; with the native relay such a call is handed to
the Python call path, which pipes it)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch

from examples.tensors import Tensors
from kubeforge import ServiceClient, contract
from kubeforge.errors import PayloadTooLargeError
from kubeforge.local import LocalDeployment, ReplicaSet, free_port

pytestmark = pytest.mark.timeout(240)

MiB = 1 << 20
ROUTER_GROWTH_LIMIT = 64 * MiB  # the bound for a 1 GiB call


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM starts again from the current RSS


@pytest.fixture(scope="module")
def deployment() -> Iterator[LocalDeployment]:
    dep = LocalDeployment(
        ReplicaSet(
            actor="examples.tensors:Tensors",
            replicas=2,
            flags=["--max-body", str(512 * MiB)],
        ),
        port=free_port(),
        router_flags=["--max-body", str(512 * MiB)],
    )
    dep.start(progress=lambda _m: None)
    try:
        yield dep
    finally:
        dep.stop()


async def test_a_256_mib_call_streams_through_the_router(deployment: LocalDeployment) -> None:
    router = deployment.router.pids[0]
    t = torch.randn(64 * MiB)  # 256 MiB of float32, sent and sent back
    assert t.nbytes > contract.STREAM_BODY
    async with ServiceClient(deployment.url, actor=Tensors, timeout=120) as client:
        await client.echo(None, torch.ones(4))  # connections and code warm
        reset_peak(router)
        before = peak_rss(router)
        out = await client.echo(None, t)
        growth = peak_rss(router) - before
        assert torch.equal(out, t)
        assert growth < ROUTER_GROWTH_LIMIT, f"router peak RSS grew {growth / MiB:.0f} MiB"
        # The connection is fine afterwards: small calls still go through.
        assert torch.equal(await client.echo(None, torch.arange(3)), torch.arange(3))


async def test_a_large_broadcast_is_uploaded_once_and_streams_to_every_replica(
    deployment: LocalDeployment,
) -> None:
    router = deployment.router.pids[0]
    state = {"w": torch.ones(32 * MiB)}  # 128 MiB, to both replicas at once
    async with ServiceClient(deployment.url, actor=Tensors, timeout=120) as client:
        await client.nbytes.fanout(torch.ones(4))
        reset_peak(router)
        before = peak_rss(router)
        sums = await client.checksum.fanout(state)
        growth = peak_rss(router) - before
        assert sums == [float(32 * MiB)] * 2
        assert growth < ROUTER_GROWTH_LIMIT, f"router peak RSS grew {growth / MiB:.0f} MiB"


async def test_concurrent_large_calls_each_arrive_whole(deployment: LocalDeployment) -> None:
    tensors = [torch.full((8 * MiB,), float(i)) for i in range(3)]  # 32 MiB each
    async with ServiceClient(deployment.url, actor=Tensors, timeout=120) as client:
        sums = await asyncio.gather(*(client.checksum(None, {"t": t}) for t in tensors))
    assert sums == [float(i * 8 * MiB) for i in range(3)]


async def test_a_body_past_max_body_is_refused_before_it_is_read(
    deployment: LocalDeployment,
) -> None:
    async with ServiceClient(deployment.url, actor=Tensors, timeout=60) as client:
        with pytest.raises(PayloadTooLargeError, match="exceeds"):
            await client.echo(None, torch.ones(160 * MiB))  # 640 MiB > 512 MiB
        assert await client.nbytes(None, torch.ones(10)) == 40
