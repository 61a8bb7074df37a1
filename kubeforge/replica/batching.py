"""Batched endpoints: concurrent calls to one `@endpoint(batch_size=N, batch_wait=S)` on a
replica become one call of the actor's method, with a list per argument, as a reward model
scores many responses in one forward pass.

A batch goes when it has `batch_size` calls, or `batch_wait` seconds after its first call
arrived, whichever is first; a batch that is running does not hold the next one back (up to
the replica's `max_concurrent_requests` batches run at once, each holding one slot). The method
returns one result per call, in call order; an exception it returns in that list is that
caller's error alone, one it raises is every caller's.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from kubeforge.errors import KubeforgeError, RemoteError
from kubeforge.metrics import Histogram
from kubeforge.replica.gang import invoke
from kubeforge.replica.streaming import remote

BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0)


@dataclass
class _Waiting:
    args: list[Any]
    kwargs: dict[str, Any]
    done: asyncio.Future[Any]


def columns(calls: list[tuple[list[Any], dict[str, Any]]]) -> tuple[list[Any], dict[str, Any]]:
    """Calls' arguments, position by position and name by name, as one list each (pure). Every
    call must give the same positions and names: a batch has one shape."""
    width = {len(args) for args, _ in calls}
    names = {frozenset(kwargs) for _, kwargs in calls}
    if len(width) != 1 or len(names) != 1:
        raise ValueError(
            "the calls of a batch must pass the same arguments, in the same way (positional or "
            "by name): pass every argument by name, or every one by position"
        )
    n = width.pop()
    args = [[call[0][i] for call in calls] for i in range(n)]
    kwargs = {name: [call[1][name] for call in calls] for name in names.pop()}
    return args, kwargs


@dataclass
class Batcher:
    """The calls of one batched endpoint on one replica, grouped."""

    name: str
    fn: Callable[..., Any]
    is_async: bool
    size: int
    wait: float
    # Runs one batch (the coroutine that calls the method) -> its results.
    run: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]
    sizes: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    largest: int = 0  # the most calls one batch has held
    _open: list[_Waiting] = field(default_factory=list)
    _timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> int:
        return len(self._open)

    async def submit(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        waiting = _Waiting(args, kwargs, loop.create_future())
        self._open.append(waiting)
        if len(self._open) >= self.size:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.wait, self._flush)
        return await asyncio.shield(waiting.done)  # a caller that gives up leaves its batch be

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._open = self._open[: self.size], self._open[self.size :]
        if self._open:  # more than a batch arrived at once: the rest start the next
            self._timer = asyncio.get_running_loop().call_later(self.wait, self._flush)
        if batch:
            self.sizes.observe(len(batch))
            self.largest = max(self.largest, len(batch))
            asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[_Waiting]) -> None:
        try:
            args, kwargs = columns([(w.args, w.kwargs) for w in batch])
            results = await self.run(functools.partial(self._call, args, kwargs))
            if not isinstance(results, list | tuple) or len(results) != len(batch):
                got = len(results) if isinstance(results, list | tuple) else type(results).__name__
                raise RemoteError(
                    "TypeError",
                    f"batched endpoint {self.name!r} must return a list of one result per call "
                    f"({len(batch)} calls in this batch), got {got}",
                )
        except asyncio.CancelledError:  # the replica is stopping
            for w in batch:
                w.done.cancel()
            raise
        except Exception as exc:
            for w in batch:
                if not w.done.done():
                    w.done.set_exception(_as_error(exc))
            return
        for w, result in zip(batch, results, strict=True):
            if w.done.done():
                continue
            if isinstance(result, BaseException):
                w.done.set_exception(_as_error(result))
            else:
                w.done.set_result(result)

    def report(self) -> dict[str, int]:
        """What the replica's health answer says of this endpoint's batches, since start: the
        router turns it into the summary's batch sizes."""
        return {"batches": self.sizes.count, "calls": int(self.sizes.sum), "largest": self.largest}

    async def _call(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        return await invoke(self.fn, self.is_async, args, kwargs)


def _as_error(exc: BaseException) -> BaseException:
    """The error a caller gets: kubeforge's own as they are (a full replica's refusal stays
    retryable), the endpoint's as RemoteError."""
    return exc if isinstance(exc, KubeforgeError) else remote(exc)
