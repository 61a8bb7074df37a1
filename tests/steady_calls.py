"""Calls kept flowing through a router while something changes under it (a certificate
renewal, say): every failure is kept, whatever its kind, for the test to assert on."""

from __future__ import annotations

import asyncio

from kubeforge import ServiceClient


class SteadyCalls:
    """`callers` clients calling the Counter's `incr` back to back until `stop`."""

    def __init__(self, url: str, token: str, callers: int = 4) -> None:
        self.calls = 0
        self.failed: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(url, token)) for _ in range(callers)]

    async def _run(self, url: str, token: str) -> None:
        async with ServiceClient(url, token=token) as client:
            while not self._stop.is_set():
                try:
                    await client.incr.route(1)
                    self.calls += 1
                except Exception as exc:  # every failure counts, whatever its kind
                    self.failed.append(repr(exc))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
