"""Concurrency slots with a bounded FIFO queue in front of them.

A freed slot is handed straight to the oldest waiter, so a burst cannot overtake callers that
queued earlier, and `active` never exceeds the limit even for a moment.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from kubeforge.errors import OverloadedError, RequestTimeoutError


class Admission:
    def __init__(self, max_active: int, max_queued: int) -> None:
        if max_active < 1 or max_queued < 0:
            raise ValueError("max_active must be >= 1 and max_queued >= 0")
        self.max_active = max_active
        self.max_queued = max_queued
        self.active = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self.waiters)

    def try_acquire(self) -> bool:
        """Take a free slot now, if one is free and nobody queues for it."""
        if self.active < self.max_active and not self.waiters:
            self.active += 1
            return True
        return False

    async def acquire(self, timeout: float) -> float:
        """Take a slot, waiting at most `timeout` seconds; returns the seconds spent queued."""
        if self.try_acquire():
            return 0.0
        if len(self.waiters) >= self.max_queued:
            raise OverloadedError(
                f"replica is at capacity: {self.active} calls running "
                f"(max_concurrent_requests={self.max_active}) and {len(self.waiters)} queued "
                f"(max_queued_requests={self.max_queued})",
            )
        loop = asyncio.get_running_loop()
        started = loop.time()
        fut: asyncio.Future[None] = loop.create_future()
        self.waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self.release()  # a slot reached us just as we gave up: pass it on
            else:
                self._forget(fut)
            if isinstance(exc, TimeoutError):
                raise RequestTimeoutError(
                    f"call timed out after {timeout:g}s waiting in the replica's queue"
                ) from None
            raise
        return loop.time() - started

    def _forget(self, fut: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self.waiters.remove(fut)
        fut.cancel()

    def release(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes to this waiter; `active` stays the same
                return
        self.active -= 1
