"""The local Service lends large bodies to its replicas through shared memory (issue 21, point
4), and a lent body is never written over while anything still views it: the actor's kept
argument, the caller's kept result. Real replica processes, real torch tensors."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator

import pytest
import torch

from examples.tensors import Tensors
from kubeforge import Service, ServiceConfig, values, wire
from kubeforge.contract import H_SHM, H_SHM_BODY
from kubeforge.http.shm import MIN_LENT, Lender
from kubeforge.local import ReplicaSet

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


@pytest.fixture
async def svc() -> AsyncIterator[Service]:
    async with Service(ServiceConfig(num_replicas=1), Tensors) as service:
        yield service


def tensor(seed: int, mib: int = 8) -> torch.Tensor:
    return torch.randn(mib * MiB // 4, generator=torch.Generator().manual_seed(seed))


async def test_a_large_call_and_its_reply_are_lent_not_sent(svc: Service) -> None:
    shm = svc.router.shm
    assert shm is not None
    lent, borrowed = shm.lender.lent, shm.borrower.borrowed
    t = tensor(1)
    back = await svc.echo(None, t)
    assert torch.equal(back, t) and back.dtype == t.dtype
    assert shm.lender.lent == lent + 1  # the call's body went into a segment
    assert shm.borrower.borrowed == borrowed + 1  # and so did the reply
    back += 1  # a lent reply arrives writable
    small = await svc.echo(None, torch.ones(16))
    assert torch.equal(small, torch.ones(16)) and shm.lender.lent == lent + 1  # small: socket


async def test_an_argument_the_actor_keeps_is_not_written_over(svc: Service) -> None:
    kept = tensor(2)
    await svc.remember(None, kept)
    for seed in range(3, 7):  # bodies of the same size, which reuse freed segments
        await svc.echo(None, tensor(seed))
    assert torch.equal(await svc.recall(None), kept)


async def test_a_result_the_caller_keeps_is_not_written_over(svc: Service) -> None:
    first = tensor(10)
    kept = await svc.echo(None, first)
    for seed in range(11, 15):
        await svc.echo(None, tensor(seed))
    assert torch.equal(kept, first)


async def test_segments_are_used_again_in_a_steady_loop(svc: Service) -> None:
    """A loop of calls of one size settles on a few segments each side: fresh pages are what
    a large call costs most on these machines."""
    shm = svc.router.shm
    assert shm is not None
    t = tensor(20, mib=4)
    result = None
    for _ in range(3):
        result = await svc.echo(None, t)
    before = shm.lender.segments
    for _ in range(6):
        result = await svc.echo(None, t)
    assert shm.lender.segments == before
    assert result is not None and torch.equal(result, t)


# A replica's checks of a lent body: a caller on this host (loopback, this user) that names
# something other than its body segment gets a 4xx and nothing else happens.


@pytest.fixture(scope="module")
def replica() -> Iterator[str]:
    rs = ReplicaSet(
        actor="examples.tensors:Tensors",
        replicas=1,
        flags=["--share-memory", "--max-body", str(4 * MiB)],
    )
    rs.start(deadline=time.monotonic() + 60, progress=lambda _m: None)
    try:
        yield rs.urls[0]
    finally:
        rs.stop(5.0)


def _post(url: str, reference: str) -> tuple[int, bytes]:
    """`nbytes` called on the replica with its body lent by this process: status, body."""
    req = urllib.request.Request(
        url + wire.CALL_PREFIX + "nbytes",
        data=b"",
        method="POST",
        headers={
            "content-type": wire.BINARY.decode(),
            H_SHM.decode(): str(os.getpid()),
            H_SHM_BODY.decode(): reference,
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _refused(url: str, reference: str) -> tuple[int, str]:
    status, body = _post(url, reference)
    return status, json.loads(body)["error"]["message"]


def test_a_reference_to_something_else_than_a_body_segment_is_refused(replica: str) -> None:
    with open(__file__, "rb") as f:  # a file this process has open: never read by a replica
        status, message = _refused(replica, f"{os.getpid()} {f.fileno()} 1 100")
    assert status == 400 and "no body segment" in message
    assert _refused(replica, "1 2 3")[0] == 400  # malformed
    assert _refused(replica, f"{os.getpid() + 1} 3 1 100")[0] == 400  # another process's
    status, message = _refused(replica, f"{os.getpid()} 0 1 {8 * MiB}")
    assert status == 413, message  # past --max-body: refused before anything is mapped


def test_the_replica_reads_a_lent_body_of_this_process(replica: str) -> None:
    """The positive case of the checks above, without the Service: a segment this process
    lends, read by the replica, its reply as usual."""
    lender = Lender()
    body = values.encode({"args": [torch.ones(MIN_LENT // 4)], "kwargs": {}})
    ref = asyncio.run(lender.lend(body.parts, body.nbytes, 1))
    assert ref is not None
    status, reply = _post(replica, ref.decode())
    assert status == 200 and values.decode(bytearray(reply))["result"] == MIN_LENT
    lender.close()
