"""Lending's bookkeeping (kubeforge/http/shm.py), on real memfd segments in one process: which
segment is written again when, and what is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from kubeforge.errors import BadRequestError, PayloadTooLargeError
from kubeforge.http.shm import Borrower, Lender

MiB = 1 << 20
PEER = os.getppid()  # a live process that is not this one


def exited_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


async def test_a_lent_segment_is_written_again_only_once_its_peer_returns_it() -> None:
    lender = Lender()
    first = await lender.lend([b"a" * MiB], MiB, PEER)
    assert first is not None and lender.segments == 1
    second = await lender.lend([b"b" * MiB], MiB, PEER)  # the first is still the peer's
    assert lender.segments == 2 and second != first
    seq = first.split()[2]
    lender.returned(seq, PEER + 1)  # another process cannot return it
    assert (await lender.lend([b"c" * MiB], MiB, PEER)) is not None and lender.segments == 3
    lender.returned(seq + b",junk,999", PEER)  # unknown items are ignored
    again = await lender.lend([b"d" * MiB], MiB, PEER)
    assert again is not None and again.split()[2] == seq and lender.segments == 3
    lender.close()


async def test_segments_lent_to_an_exited_process_are_free_again() -> None:
    lender = Lender()
    await lender.lend([b"x" * MiB], MiB, exited_pid())
    assert lender.lent_bytes == MiB
    await lender.lend([b"y" * MiB], MiB, PEER)  # a new segment is wanted: reclaims first
    assert lender.segments == 1 and lender.lent_bytes == MiB
    lender.close()


async def test_past_the_limit_a_body_is_not_lent() -> None:
    lender = Lender(limit=2 * MiB)
    assert await lender.lend([b"x" * MiB], MiB, PEER) is not None
    assert await lender.lend([b"x" * MiB], MiB, PEER) is not None
    assert await lender.lend([b"x" * MiB], MiB, PEER) is None  # both lent: the socket instead
    lender.close()


async def test_a_borrowed_body_is_returned_once_nothing_views_it() -> None:
    lender, borrower = Lender(), Borrower()
    me = os.getpid()
    data = np.arange(MiB // 8, dtype=np.float64)
    ref = await lender.lend([b"head", data], 4 + data.nbytes, me)
    assert ref is not None
    view = borrower.borrow(ref, me, 8 * MiB)
    assert bytes(view[:4]) == b"head"
    arr = np.frombuffer(view[4:], dtype=np.float64)
    assert np.array_equal(arr, data) and arr.flags.writeable
    del view
    assert borrower.unviewed(me) == b""  # the array still views it
    del arr
    assert borrower.unviewed(me) == ref.split()[2]
    assert borrower.unviewed(me) == b""  # listed once
    lender.close()


def test_references_that_name_no_segment_are_refused() -> None:
    borrower = Borrower()
    me = os.getpid()
    with pytest.raises(BadRequestError, match="4 numbers"):
        borrower.borrow(b"1 2 3", me, MiB)
    with pytest.raises(BadRequestError, match="another process"):
        borrower.borrow(b"%d 3 1 10" % (me + 1), me, MiB)
    with pytest.raises(PayloadTooLargeError):
        borrower.borrow(b"%d 3 1 %d" % (me, 2 * MiB), me, MiB)
    with open(__file__, "rb") as f, pytest.raises(BadRequestError, match="no body segment"):
        borrower.borrow(b"%d %d 1 10" % (me, f.fileno()), me, MiB)
    with pytest.raises(BadRequestError, match="cannot open"):
        borrower.borrow(b"%d 987654 1 10" % me, me, MiB)
