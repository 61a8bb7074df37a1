"""Run a coroutine's first step now, and arm a deadline only if it has to wait.

Most endpoints of a serving actor finish without waiting on anything (a no-op, a cache hit, a
computation). Arming `asyncio.timeout` for those costs more than the call itself: a timer
scheduled and cancelled, the current task looked up, a context manager entered and left. Its
first step runs here, in the caller's task, exactly as `await` would run it; a coroutine that
returns from it needs no deadline, since no timer can interrupt synchronous code anyway. One
that waits goes on through `Resumed` under the deadline, from where it stopped.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any


def first_step(coro: Coroutine[Any, Any, Any]) -> Resumed:
    """Step `coro` until it first waits. What comes back is done (`done`, with its `value`)
    when the coroutine returned instead; exceptions it raises come out here as they would
    from `await coro`. (A flag, not an exception: most endpoints return at once.)"""
    try:
        waiting_on = coro.send(None)
    except StopIteration as stop:
        return Resumed(None, None, stop.value)
    return Resumed(coro, waiting_on)


class Resumed:
    """Await this to go on with a coroutine that `first_step` left waiting on a future: the
    enclosing task waits on that future, then drives the coroutine on, passing cancellation
    (a deadline) and errors into it as a task would."""

    __slots__ = ("coro", "value", "waiting_on")

    def __init__(
        self, coro: Coroutine[Any, Any, Any] | None, waiting_on: Any, value: Any = None
    ) -> None:
        self.coro = coro
        self.waiting_on = waiting_on
        self.value = value  # the coroutine's result, when its first step returned

    @property
    def done(self) -> bool:
        return self.coro is None

    def __await__(self) -> Generator[Any, None, Any]:
        coro, waiting_on = self.coro, self.waiting_on
        if coro is None:
            return self.value
        while True:
            try:
                yield waiting_on
            except BaseException as exc:
                try:
                    waiting_on = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    waiting_on = coro.send(None)
                except StopIteration as stop:
                    return stop.value
