"""A streaming endpoint on an SPMD replica, rank 0's side.

Every rank runs the generator; rank 0's items are the ones sent. The stream holds the gang's
order from its opening to its close, and each item is one step taken on every rank at once, so
collectives inside the generator meet step by step and no other call runs between them. A step
that has begun ends on every rank even when the caller leaves or a deadline passes (a
collective cannot be abandoned by some ranks only); then every rank closes its generator at the
same item, and the order moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from kubeforge.errors import RemoteError
from kubeforge.replica.gang import END, Gang, rank_results
from kubeforge.replica.streaming import Call, Items, local_items

_END = object()
_closers: set[asyncio.Future[None]] = set()  # closes started by a callback: kept until done


class GangItems:
    """`Items` for an SPMD replica's stream (see the module's docstring)."""

    def __init__(self, local: Items, gang: Gang, release: Callable[[], None]) -> None:
        self.local = local
        self.gang = gang
        self.release = release
        self._step: asyncio.Future[Any] | None = None
        self._closing: asyncio.Future[None] | None = None

    @classmethod
    async def open(cls, gang: Gang, fn: Callable[..., Any], call: Call, body: Any) -> GangItems:
        """Wait for the stream's turn in the order, then start the generator on every rank."""
        release = await gang.take_turn()
        opening = asyncio.ensure_future(cls._open(gang, fn, call, body, release))
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:  # the caller gave up: close it once it is open
            opening.add_done_callback(_close_when_open)
            raise

    @classmethod
    async def _open(
        cls, gang: Gang, fn: Callable[..., Any], call: Call, body: Any, release: Callable[[], None]
    ) -> GangItems:
        fields = {"endpoint": call.info.name, "body": body, "format": call.fmt, "session": call.sid}
        try:
            outcomes = await gang.exchange("stream", fields)
            local = await local_items(fn, call)()  # rank 0's own, made as on any replica
        except BaseException:
            await _finish(gang, release)
            raise
        items = cls(local, gang, release)
        try:
            rank_results([(True, None), *outcomes], False)  # another rank could not start it
        except RemoteError:
            await items.close()
            raise
        return items

    async def next(self) -> Any:
        if self._step is None:
            self._step = asyncio.ensure_future(self._both())
        item = await asyncio.shield(self._step)  # cancelled: the step still ends everywhere
        self._step = None
        if item is _END:
            raise StopAsyncIteration
        return item

    async def _both(self) -> Any:
        """One step on every rank: rank 0's item, once every rank has made its own."""
        others = asyncio.ensure_future(self.gang.exchange("step", {}))
        try:
            item = await self.local.next()
        except StopAsyncIteration:
            item = _END
        except BaseException:
            with contextlib.suppress(Exception):
                await others  # rank 0's error is the one the caller gets
            raise
        outcomes = await others
        rank_results([(True, None), *outcomes], False)  # a rank's own error, naming it
        differ = [r for r, (_, got) in enumerate(outcomes, 1) if (got == END) != (item is _END)]
        if differ:
            ended, went_on = ("rank 0", f"rank {differ[0]}")
            if item is not _END:
                ended, went_on = went_on, ended
            raise RemoteError(
                "RuntimeError",
                f"{ended} ended its stream where {went_on} yielded another item: every rank of "
                "an SPMD replica must yield the same number of items",
            )
        return item

    async def close(self) -> None:
        """Every rank closes its generator after the step in progress, once."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        if self._step is not None:
            await asyncio.wait([self._step])
        try:
            await self.local.close()
        finally:
            await _finish(self.gang, self.release)


async def _finish(gang: Gang, release: Callable[[], None]) -> None:
    """The other ranks close their generator (if they opened one); the order moves on."""
    try:
        await gang.exchange("close", {})
    finally:
        release()


def _close_when_open(opening: asyncio.Future[GangItems]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        closer = asyncio.ensure_future(opening.result().close())
        _closers.add(closer)
        closer.add_done_callback(_closers.discard)
