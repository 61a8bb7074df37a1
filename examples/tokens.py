"""A streaming actor: endpoints that are generators yield their items to the caller as they
come, as a policy yields tokens.

    async for token in svc.generate.stream("hello", n=5):
        print(token)

    curl -N -H 'Accept: text/event-stream' -d '{"args": ["hello"]}' \\
        http://127.0.0.1:8080/v1/stream/generate
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from kubeforge import Actor, current_session, endpoint


class Tokens(Actor):
    def __init__(self) -> None:
        self.closed: list[dict[str, Any]] = []  # streams that ended early, and how
        self.produced = 0

    @endpoint
    async def generate(self, prompt: str, n: int = 5, delay: float = 0.0) -> AsyncIterator[str]:
        """`n` tokens, one every `delay` seconds."""
        for i in range(n):
            if delay:
                await asyncio.sleep(delay)
            self.produced += 1
            yield f"{prompt}-{i}"

    @endpoint
    def count(self, n: int, delay: float = 0.0) -> Iterator[int]:
        """A sync generator: each step runs in a worker thread."""
        for i in range(n):
            if delay:
                time.sleep(delay)
            yield i

    @endpoint
    async def paced(self, gaps: list[float]) -> AsyncIterator[int]:
        """Item i after a pause of gaps[i] seconds."""
        for i, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            yield i

    @endpoint
    async def fail_after(self, n: int) -> AsyncIterator[int]:
        """`n` items, then an exception."""
        for i in range(n):
            yield i
        raise ValueError(f"failed after {n} items")

    @endpoint
    async def blobs(self, n: int, size: int) -> AsyncIterator[bytes]:
        """`n` items of `size` bytes each, numbered in their first byte."""
        for i in range(n):
            self.produced += 1
            yield bytes([i % 256]) * size

    @endpoint
    async def watched(self, n: int, delay: float = 0.05) -> AsyncIterator[dict[str, Any]]:
        """Items every `delay` s; when the caller goes away the generator is closed, and the
        actor records how (the state a real policy would free: a KV cache)."""
        started = time.monotonic()
        try:
            for i in range(n):
                self.produced += 1
                yield {"i": i, "session": current_session(), "pid": os.getpid()}
                await asyncio.sleep(delay)
        except (asyncio.CancelledError, GeneratorExit) as exc:
            self.closed.append(
                {
                    "how": type(exc).__name__,
                    "at": time.time(),
                    "after_s": time.monotonic() - started,
                }
            )
            raise

    @endpoint
    async def closed_streams(self) -> list[dict[str, Any]]:
        return self.closed

    @endpoint
    async def stats(self) -> dict[str, int]:
        return {"produced": self.produced, "pid": os.getpid()}

    @endpoint
    async def mark(self, marked: bool = True) -> None:
        """Make this replica's `nap()` slow (call it in a session to pick the replica)."""
        self.marked = marked

    @endpoint
    async def nap(self, seconds: float) -> int:
        """Answers after `seconds` on a marked replica, at once on the others: its pid."""
        if getattr(self, "marked", False):
            await asyncio.sleep(seconds)
        return os.getpid()

    @endpoint
    async def plain(self, x: int) -> int:
        """Not a stream: `.stream()` on it is a 400 that says to call it."""
        return x + 1
