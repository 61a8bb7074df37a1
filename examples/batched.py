"""A batched actor: concurrent calls on one replica become one call of the method, with a list
per argument, as a reward model scores many responses in one forward pass.

    @endpoint(batch_size=16, batch_wait=0.005)
    async def score(self, texts: list[str]) -> list[float]: ...

    await svc.score.route("one response")   # each caller passes one value, gets one result

`score` costs a fixed 2 ms per call plus 0.05 ms per item, the shape of a forward pass: what
bench/batching.py measures with and without batching.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from kubeforge import Actor, endpoint

PER_CALL = 0.002
PER_ITEM = 0.00005


class Scorer(Actor):
    def __init__(self) -> None:
        self.batches: list[int] = []

    @endpoint(batch_size=16, batch_wait=0.005)
    async def score(self, texts: list[str]) -> list[float]:
        self.batches.append(len(texts))
        await asyncio.sleep(PER_CALL + PER_ITEM * len(texts))
        return [float(len(t)) for t in texts]

    @endpoint
    async def score_one(self, text: str) -> float:
        """The same cost for one item, unbatched: the baseline."""
        await asyncio.sleep(PER_CALL + PER_ITEM)
        return float(len(text))

    @endpoint(batch_size=8, batch_wait=0.02)
    async def checked(self, xs: list[int]) -> list[Any]:
        """A negative number is that caller's error alone; the others get their results."""
        self.batches.append(len(xs))
        return [ValueError(f"{x} is negative") if x < 0 else x * 10 for x in xs]

    @endpoint(batch_size=4, batch_wait=0.02)
    def doubled(self, xs: list[int], by: list[int]) -> list[int]:
        """A sync batched method (it runs in a worker thread), with two arguments."""
        time.sleep(0.001)
        return [x * b for x, b in zip(xs, by, strict=True)]

    @endpoint(batch_size=4, batch_wait=0.02)
    async def short(self, xs: list[int]) -> list[int]:
        """Returns one result too few: every caller of the batch gets the error saying so."""
        return xs[:-1]

    @endpoint
    async def batch_sizes(self) -> list[int]:
        return self.batches
