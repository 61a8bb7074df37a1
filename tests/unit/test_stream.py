"""BodyStream (kubeforge/http/stream.py): bounded buffering, one read, tee at the slowest
branch's pace. Pure asyncio, no sockets."""

from __future__ import annotations

import asyncio

import pytest

from kubeforge.http.stream import HIGH, LOW, BodyStream, StreamError


class Producer:
    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.cancelled = False

    def pause(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume(self) -> None:
        self.paused = False

    def cancel(self) -> None:
        self.cancelled = True


def stream(length: int, p: Producer) -> BodyStream:
    return BodyStream(length, p.pause, p.resume, p.cancel)


async def test_the_producer_pauses_above_high_and_resumes_below_low() -> None:
    p = Producer()
    chunk = b"x" * (1 << 20)
    n = HIGH // len(chunk) + 3
    s = stream(len(chunk) * n, p)
    for _ in range(n):
        s.feed(chunk)
    assert p.paused and p.pauses == 1
    got = 0
    async for part in s.chunks():
        got += len(part)
        assert p.paused == (len(chunk) * n - got >= LOW)  # resumed once below LOW
        if got == len(chunk) * 2:
            s.end()  # ends once every byte has arrived: all of them are here already
    assert got == len(chunk) * n


async def test_a_body_that_ends_short_fails_its_reader() -> None:
    p = Producer()
    s = stream(10, p)
    s.feed(b"12345")
    s.end()
    with pytest.raises(StreamError, match="5 of 10"):
        async for _ in s.chunks():
            pass


async def test_a_stream_is_read_once_and_knows_it_started() -> None:
    s = stream(3, Producer())
    s.feed(b"abc")
    s.end()
    assert not s.started
    assert [c async for c in s.chunks()] == [b"abc"]
    assert s.started
    with pytest.raises(StreamError, match="only once"):
        async for _ in s.chunks():
            pass


async def test_cancel_stops_the_producer() -> None:
    p = Producer()
    s = stream(10, p)
    s.cancel("gone")
    assert p.cancelled
    with pytest.raises(StreamError, match="gone"):
        async for _ in s.chunks():
            pass


async def test_tee_gives_every_branch_every_byte_at_the_slowest_pace() -> None:
    p = Producer()
    chunk = b"y" * (1 << 20)
    n = 3 * HIGH // len(chunk)
    source = stream(len(chunk) * n, p)
    fast, slow = source.tee(2)

    async def feed() -> None:
        for _ in range(n):
            while p.paused:
                await asyncio.sleep(0)
            source.feed(chunk)
            await asyncio.sleep(0)
        source.end()

    async def read(branch: BodyStream, delay: float) -> int:
        total = 0
        async for part in branch.chunks():
            total += len(part)
            await asyncio.sleep(delay)
        return total

    feeder = asyncio.create_task(feed())
    totals = await asyncio.gather(read(fast, 0), read(slow, 0.001))
    await feeder
    assert totals == [len(chunk) * n] * 2
    assert p.pauses >= 1  # the slow branch held the source back
