"""Receive buffers for large bodies, reused once nothing views them any more.

Decoded arrays are views of the buffer a body was received into, so a buffer is free only when
the last of them is gone. On these machines writing fresh memory costs more than copying into
memory already mapped (the kernel zeroes and maps each new page: 256 MiB takes about 150 ms
before a byte is copied), and glibc hands every allocation over 32 MiB back to the kernel when
it is freed, so each large call would pay that again. The pool keeps large buffers mapped and
hands one out again once its reference count shows that no memoryview, array or tensor holds it
(CPython counts each view's reference to the buffer it exports from).

Idle pooled memory stays resident up to `KUBEFORGE_BUFFER_POOL` bytes (default 2 GiB; 0 turns
the pool off), as an object store keeps its arena.
"""

from __future__ import annotations

import mmap
import os
import sys

POOL_MIN = 1 << 20  # smaller buffers come from malloc
_LIMIT = int(os.environ.get("KUBEFORGE_BUFFER_POOL", str(2 << 30)))


def _base_refs() -> int:
    """References a pooled buffer has when nothing outside the pool holds it, counted the way
    `BufferPool._idle` counts them (its list, the loop variable, getrefcount's argument)."""
    held = [mmap.mmap(-1, mmap.PAGESIZE)]
    counts = [sys.getrefcount(mm) for mm in held]
    held[0].close()
    return counts[0]


_BASE = _base_refs()


class BufferPool:
    def __init__(self, limit: int = _LIMIT) -> None:
        self.limit = limit
        self._buffers: list[mmap.mmap] = []

    def take(self, length: int) -> bytearray | memoryview:
        """A writable buffer of exactly `length` bytes, its content undefined."""
        if length < POOL_MIN or self.limit <= 0:
            return bytearray(length)
        best = self._idle(length)
        if best is None:
            best = mmap.mmap(-1, length)
            self._buffers.append(best)
            self._trim()
        return memoryview(best)[:length]

    def _idle(self, length: int) -> mmap.mmap | None:
        """The smallest idle buffer that holds `length` bytes without wasting half of it."""
        best: mmap.mmap | None = None
        for mm in self._buffers:
            fits = length <= len(mm) <= 2 * length and (best is None or len(mm) < len(best))
            if fits and sys.getrefcount(mm) == _BASE:
                best = mm
        return best

    def _trim(self) -> None:
        """Unmap idle buffers, largest first, while the idle ones exceed the limit."""
        idle = sorted((mm for mm in self._buffers if sys.getrefcount(mm) == _BASE), key=len)
        total = sum(len(mm) for mm in idle)
        while idle and total > self.limit:
            mm = idle.pop()
            total -= len(mm)
            self._buffers.remove(mm)
            mm.close()

    @property
    def pooled_bytes(self) -> int:
        return sum(len(mm) for mm in self._buffers)


POOL = BufferPool()
