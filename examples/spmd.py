"""An SPMD actor without torch: its ranks rendezvous on MASTER_ADDR:MASTER_PORT, as
torch.distributed's `env://` does, and all-gather through a small TCP store of their own.

`gather` is a collective: every rank must run it, and run the k-th call as its k-th call, or the
ranks would disagree on what round k gathered. Tests and the README use it to show that a
replica's ranks see the same calls in the same order.

    cfg = ServiceConfig(num_replicas=2, procs=2)
    svc = await Service(cfg, RankCounter).start()
    await svc.gather.route("x")    # [{"rank": 0, "tag": "x"}, {"rank": 1, "tag": "x"}]
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from typing import Any

from kubeforge import Actor, current_rank, endpoint


class Store:
    """A key-value store on rank 0; `get` waits until the key is there (torch's TCPStore)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.changed = asyncio.Condition()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                op = json.loads(line)
                async with self.changed:
                    if op["op"] == "set":
                        self.data[op["key"]] = op["value"]
                        self.changed.notify_all()
                        answer: Any = True
                    else:
                        key = op["key"]
                        await self.changed.wait_for(lambda k=key: k in self.data)
                        answer = self.data[key]
                writer.write(json.dumps(answer).encode() + b"\n")
        except (asyncio.CancelledError, ConnectionError):
            pass  # the process is stopping, or the rank went away
        finally:
            writer.close()


class StoreClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.lock = asyncio.Lock()

    @classmethod
    async def connect(cls, host: str, port: int, timeout: float = 30.0) -> StoreClient:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                return cls(*await asyncio.open_connection(host, port))
            except OSError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def _ask(self, op: dict[str, Any]) -> Any:
        async with self.lock:
            self.writer.write(json.dumps(op).encode() + b"\n")
            return json.loads(await self.reader.readline())

    async def set(self, key: str, value: Any) -> None:
        await self._ask({"op": "set", "key": key, "value": value})

    async def get(self, key: str) -> Any:
        return await self._ask({"op": "get", "key": key})


class RankCounter(Actor):
    """Every rank counts the calls it runs; rank 0's count is what a caller sees."""

    def __init__(self, start: int = 0, fail_setup_on: int | None = None) -> None:
        self.calls = start
        self.rounds = 0
        self.running = 0
        self.most_running = 0  # calls seen running at once on this rank: 1 when in order
        self.fail_setup_on = fail_setup_on

    async def setup(self) -> None:
        self.me = current_rank()
        if self.me.rank == self.fail_setup_on:
            raise RuntimeError(f"rank {self.me.rank} was asked to fail its setup")
        if self.me.world_size == 1:  # procs=1: a world of one, nobody to meet
            return
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        if self.me.rank == 0:
            self.server = await asyncio.start_server(Store().serve, addr, port)
        self.store = await StoreClient.connect(addr, port)
        # The rendezvous: nobody is set up until every rank of the world has joined.
        await self._all_gather("joined", self.me.rank)

    async def _all_gather(self, key: str, value: Any) -> list[Any]:
        if self.me.world_size == 1:
            return [value]
        await self.store.set(f"{key}/{self.me.rank}", value)
        return [await self.store.get(f"{key}/{r}") for r in range(self.me.world_size)]

    @endpoint
    async def incr(self) -> dict[str, int]:
        self.calls += 1
        return {"rank": self.me.rank, "calls": self.calls}

    @endpoint
    async def gather(self, tag: str) -> list[dict[str, Any]]:
        """All-gather `tag` from every rank: this call's k-th run on each rank meets the other
        ranks' k-th run, so any two ranks that ran calls in different orders disagree here."""
        self.rounds += 1
        mine = self.rounds
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(random.random() * 0.005)  # invites overlap, were it allowed
            return await self._all_gather(f"round-{mine}", {"rank": self.me.rank, "tag": tag})
        finally:
            self.running -= 1

    @endpoint
    async def overlap(self) -> int:
        """The most calls this rank ever ran at once."""
        return self.most_running

    @endpoint
    async def stall(self, rank: int, seconds: float) -> None:
        """Block rank `rank`'s event loop, as a runaway computation on it would."""
        if self.me.rank == rank:
            time.sleep(seconds)

    @endpoint
    def env(self) -> dict[str, Any]:
        names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
        return {
            **{n.lower(): os.environ.get(n) for n in names},
            "master_port": os.environ.get("MASTER_PORT"),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "pid": os.getpid(),
            "calls": self.calls,
        }

    @endpoint
    async def fail_on(self, rank: int) -> int:
        if self.me.rank == rank:
            raise ValueError(f"rank {rank} was asked to fail")
        return self.me.rank
