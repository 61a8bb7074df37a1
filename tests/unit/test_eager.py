"""A coroutine's first step run at once, the rest under a deadline (kubeforge.replica.eager):
it behaves as `await` would, with real asyncio."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kubeforge.replica import eager


async def _run(coro: Any, seconds: float = 1.0) -> Any:
    """As the replica runs an endpoint: first step now, the rest under a deadline."""
    rest = eager.first_step(coro)
    if rest.done:
        return ("at once", rest.value)
    async with asyncio.timeout(seconds):
        return ("waited", await rest)


async def test_a_coroutine_that_never_waits_is_done_in_its_first_step() -> None:
    async def quick() -> int:
        return 7

    assert await _run(quick()) == ("at once", 7)


async def test_awaiting_a_finished_step_gives_its_value() -> None:
    async def quick() -> str:
        return "x"

    step = eager.first_step(quick())
    assert step.done
    assert await step == "x"


async def test_one_that_waits_goes_on_in_the_callers_task() -> None:
    seen: list[Any] = []

    async def slow() -> str:
        seen.append(asyncio.current_task())
        async with asyncio.timeout(1):  # needs a current task, in its first step too
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # a bare yield to the loop
        seen.append(asyncio.current_task())
        return "done"

    assert await _run(slow()) == ("waited", "done")
    assert seen == [asyncio.current_task()] * 2


async def test_the_deadline_cancels_it_where_it_waits() -> None:
    cleaned = asyncio.Event()

    async def stuck() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            cleaned.set()

    with pytest.raises(TimeoutError):
        await _run(stuck(), seconds=0.05)
    assert cleaned.is_set()


async def test_errors_come_out_as_await_gives_them() -> None:
    async def fails_at_once() -> None:
        raise KeyError("first")

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise ValueError("later")

    with pytest.raises(KeyError, match="first"):
        await _run(fails_at_once())
    with pytest.raises(ValueError, match="later"):
        await _run(fails_later())


async def test_an_error_thrown_in_is_the_coroutines_to_handle() -> None:
    async def catches() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "handled"
        return "not reached"

    task = asyncio.get_running_loop().create_task(_run(catches()))
    await asyncio.sleep(0.01)
    task.cancel()
    assert await task == ("waited", "handled")
