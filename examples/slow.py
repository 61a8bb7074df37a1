"""An actor whose calls take a configurable time: for queueing, timeouts and load tests."""

import asyncio
import os
import time

from kubeforge import Actor, endpoint


class Slow(Actor):
    def __init__(self, delay: float = 0.1) -> None:
        self.delay = delay

    @endpoint
    async def work(self, delay: float | None = None) -> float:
        """Sleep (without blocking the replica) and return the time slept."""
        d = self.delay if delay is None else delay
        await asyncio.sleep(d)
        return d

    @endpoint
    def block(self, delay: float | None = None) -> float:
        """Sleep in a worker thread, as a CPU-bound sync endpoint would."""
        d = self.delay if delay is None else delay
        time.sleep(d)
        return d

    @endpoint
    async def whoami(self) -> dict[str, object]:
        return {"replica": os.environ.get("KUBEFORGE_REPLICA_NAME", ""), "pid": os.getpid()}
