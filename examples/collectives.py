"""An SPMD actor on torch.distributed: its ranks form one process group (gloo on CPU, NCCL on
GPUs) from the environment kubeforge gives every rank, and its endpoints are collectives.

    cfg = ServiceConfig(num_replicas=2, procs=2, return_first_rank_result=False)
    svc = await Service(cfg, Collectives).start()
    await svc.all_reduce.route(torch.ones(4))   # [tensor([3., 3., 3., 3.])] * 2: rank r adds r+1

Every rank runs every call, in one order, so a collective cannot hang on a rank that is busy
with another call. A collective blocks the thread it runs on; it runs in a worker thread here,
so the rank keeps answering health checks while it waits for its peers.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kubeforge import Actor, current_rank, endpoint


class Collectives(Actor):
    def __init__(self, backend: str = "", timeout_s: float = 60.0) -> None:
        # gloo unless CUDA is there and asked for: NCCL needs a GPU per rank.
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.timeout = timedelta(seconds=timeout_s)

    async def setup(self) -> None:
        self.me = current_rank()
        started = time.monotonic()
        # env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from kubeforge.
        await asyncio.to_thread(
            dist.init_process_group, self.backend, init_method="env://", timeout=self.timeout
        )
        self.formed_in = time.monotonic() - started
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.backend == "nccl"
            else torch.device("cpu")
        )

    @endpoint
    async def info(self) -> dict[str, Any]:
        return {
            "rank": dist.get_rank(),
            "world_size": dist.get_world_size(),
            "backend": dist.get_backend(),
            "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            "pid": os.getpid(),
            "formed_in_s": self.formed_in,
        }

    @endpoint
    async def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `t * (rank + 1)`: every rank's share is in the answer."""
        x = t.to(self.device) * (dist.get_rank() + 1)
        await asyncio.to_thread(dist.all_reduce, x)
        return x

    @endpoint
    async def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """`t + rank` from every rank, in rank order."""
        mine = t.to(self.device) + dist.get_rank()
        out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        await asyncio.to_thread(dist.all_gather, out, mine)
        return out

    @endpoint
    async def late_all_reduce(self, t: torch.Tensor, late_rank: int, seconds: float) -> Any:
        """`all_reduce`, with rank `late_rank` joining `seconds` late: the others wait in it."""
        if dist.get_rank() == late_rank:
            await asyncio.sleep(seconds)
        return await self.all_reduce(t)

    @endpoint
    async def running_sums(
        self, t: torch.Tensor, n: int, fail_rank: int = -1, fail_at: int = -1
    ) -> AsyncIterator[torch.Tensor]:
        """A stream whose every item is a collective: item i is `all_reduce(t * (rank + 1))`
        plus i. Rank `fail_rank` raises after the collective of item `fail_at` instead of
        yielding it. `stream_log()` tells what each rank's generator did."""
        me = dist.get_rank()
        self.steps: list[Any] = []
        try:
            for i in range(n):
                x = t.to(self.device) * (me + 1)
                await asyncio.to_thread(dist.all_reduce, x)
                if me == fail_rank and i == fail_at:
                    raise ValueError(f"rank {me} fails at item {i}")
                self.steps.append(i)
                yield x + i
        finally:
            self.steps.append("closed")

    @endpoint
    async def stream_log(self) -> list[Any]:
        return getattr(self, "steps", [])

    @endpoint(batch_size=8, batch_wait=0.05)
    async def reduce_each(self, ts: list[torch.Tensor]) -> list[torch.Tensor]:
        """A batched endpoint on an SPMD replica: one all_reduce for the whole batch (stacked,
        reduced, split), each caller's tensor times the sum of (rank + 1)."""
        self.batches = [*getattr(self, "batches", []), len(ts)]
        x = torch.stack([t.to(self.device) for t in ts]) * (dist.get_rank() + 1)
        await asyncio.to_thread(dist.all_reduce, x)
        return list(x.unbind())

    @endpoint
    async def batch_log(self) -> list[int]:
        return getattr(self, "batches", [])
