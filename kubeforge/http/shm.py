"""Large bodies lent through shared memory between two processes of one host.

Over loopback TCP a body is copied twice on its way (into the kernel, out of it), and a round
trip carries it both ways. Lent, it is copied once: the sender writes it into a segment of its
own (a memfd it maps once and keeps) and sends only the segment's name; the receiver decodes
views of its own mapping of that segment, also made once and kept. The segment is the
receiver's until it says it no longer views it: the next message it sends the owner lists it
as free, and only then does the owner write into it again. Segments and mappings are kept for
the next body, as the receive buffer pool keeps its buffers, because fresh pages (and mapping
a quarter gigabyte again) cost more than the copy itself on these machines; an owner that
lets a segment go tells the peers that mapped it, which then unmap it.

Only peers that both ask for it lend: the local `Service`'s call path, and the replicas it
starts with `--share-memory`. A receiver opens the owner's segment as /proc/<pid>/fd/<fd>,
which needs the owner's user, and maps nothing that is not a kubeforge segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from kubeforge.contract import H_SHM, H_SHM_BODY, H_SHM_DROP, H_SHM_FREE
from kubeforge.errors import BadRequestError, PayloadTooLargeError
from kubeforge.http.server import body_length, body_parts
from kubeforge.http.stream import BodyStream

MIN_LENT = 1 << 20  # smaller bodies cross the socket, as fast there, and hold no segment
_NAME = "kubeforge-body"
_ALIGN = 1 << 20
_SLICE = 32 << 20  # bytes copied between two turns of the event loop
_THREADS = max(1, min(4, os.cpu_count() or 1))
_LIMIT = int(os.environ.get("KUBEFORGE_SHM_LIMIT", str(4 << 30)))


class _Segment:
    __slots__ = ("fd", "lent_to", "mm", "peers", "seq")

    def __init__(self, seq: int, size: int) -> None:
        self.seq = seq
        self.fd = os.memfd_create(_NAME, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size)
        except OSError:
            os.close(self.fd)
            raise
        self.lent_to = 0  # the pid viewing it; 0 when free
        self.peers: set[int] = set()  # every pid it was lent to: they may keep it mapped

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


async def _copy(view: memoryview, at: int, data: memoryview) -> None:
    """`data` into `view` at `at`, without holding the event loop for long: a large part is
    copied by numpy (when the process has it, as it does when it sends arrays) in threads that
    release the GIL, in as many slices as there are cores, up to 4 (one core's copy does not
    use the memory's bandwidth); else in slices between turns of the loop."""
    numpy = sys.modules.get("numpy")
    if numpy is None or data.nbytes < _SLICE:
        for start in range(0, data.nbytes, _SLICE):
            piece = data[start : start + _SLICE]
            view[at + start : at + start + piece.nbytes] = piece
            if data.nbytes > _SLICE:
                await asyncio.sleep(0)
        return
    target = numpy.frombuffer(view, numpy.uint8, data.nbytes, at)
    source = numpy.frombuffer(data, numpy.uint8)
    step = -(-data.nbytes // _THREADS)
    await asyncio.gather(
        *(
            asyncio.to_thread(numpy.copyto, target[i : i + step], source[i : i + step])
            for i in range(0, data.nbytes, step)
        )
    )


def _seqs(listed: bytes | None) -> list[int]:
    return [int(item) for item in (listed or b"").split(b",") if item.isdigit()]


class Lender:
    """The segments this process writes bodies into, up to `limit` bytes of them."""

    def __init__(self, limit: int = _LIMIT) -> None:
        self.pid = os.getpid()
        self.limit = limit
        self._segments: dict[int, _Segment] = {}
        self._dropped: dict[int, list[int]] = {}  # peer pid -> segments let go, to tell it
        self._next = 1
        self.lent = 0  # bodies lent since the start

    async def lend(self, parts: Iterable[Any], nbytes: int, peer: int) -> bytes | None:
        """Write a body into a free segment, now `peer`'s to view: the reference to send, or
        None when no segment can be had (the body then crosses the socket). The copy yields
        to the event loop between slices: a gigabyte into fresh pages takes most of a second,
        and health checks must be answered meanwhile."""
        segment = self._free(nbytes)
        if segment is None:  # before making one: a process that exited may hold one
            self._reclaim()
            segment = self._free(nbytes) or self._new(nbytes)
        if segment is None:
            return None
        segment.lent_to = peer  # taken: no other call writes into it meanwhile
        segment.peers.add(peer)
        with memoryview(segment.mm) as view:
            at = 0
            for part in parts:
                with memoryview(part) as source, source.cast("B") as data:
                    await _copy(view, at, data)
                    at += data.nbytes
        self.lent += 1
        return b"%d %d %d %d" % (self.pid, segment.fd, segment.seq, nbytes)

    def returned(self, listed: bytes | None, peer: int) -> None:
        """`peer` says it views these segments no more (its H_SHM_FREE header)."""
        for seq in _seqs(listed):
            segment = self._segments.get(seq)
            if segment is not None and segment.lent_to == peer:
                segment.lent_to = 0

    def dropped(self, peer: int) -> bytes:
        """Segments let go since `peer` was last told (its H_SHM_DROP header): it unmaps them."""
        return b",".join(b"%d" % seq for seq in self._dropped.pop(peer, ()))

    def _free(self, nbytes: int) -> _Segment | None:
        """The smallest free segment that holds `nbytes` without wasting half of it."""
        best: _Segment | None = None
        for s in self._segments.values():
            size = len(s.mm)
            fits = not s.lent_to and nbytes <= size <= 2 * nbytes + _ALIGN
            if fits and (best is None or size < len(best.mm)):
                best = s
        return best

    def _new(self, nbytes: int) -> _Segment | None:
        size = -(-nbytes // _ALIGN) * _ALIGN
        free = sorted(
            (s for s in self._segments.values() if not s.lent_to), key=lambda s: len(s.mm)
        )
        total = sum(len(s.mm) for s in self._segments.values())
        while free and total + size > self.limit:  # the largest free ones go first
            gone = free.pop()
            total -= len(gone.mm)
            self._let_go(gone)
        if total + size > self.limit:
            return None
        try:
            segment = _Segment(self._next, size)
        except OSError:
            return None
        self._next += 1
        self._segments[segment.seq] = segment
        return segment

    def _let_go(self, segment: _Segment) -> None:
        del self._segments[segment.seq]
        segment.close()
        for peer in segment.peers:
            self._dropped.setdefault(peer, []).append(segment.seq)

    def _reclaim(self) -> None:
        """Segments lent to a process that has exited are free again."""
        for s in self._segments.values():
            for peer in list(s.peers):
                try:
                    os.kill(peer, 0)
                except ProcessLookupError:
                    s.peers.discard(peer)
                    self._dropped.pop(peer, None)
                    if s.lent_to == peer:
                        s.lent_to = 0
                except PermissionError:
                    pass

    @property
    def lent_bytes(self) -> int:
        return sum(len(s.mm) for s in self._segments.values() if s.lent_to)

    @property
    def segments(self) -> int:
        return len(self._segments)

    def close(self) -> None:
        for s in self._segments.values():
            with contextlib.suppress(BufferError):  # a view of it is still alive: left mapped
                s.close()
        self._segments.clear()


def _unviewed_refs() -> int:
    """References a borrowed mapping has when nothing views it, counted the way
    `Borrower.unviewed` counts them (its table, a local, getrefcount's argument)."""
    table = {1: mmap.mmap(-1, mmap.PAGESIZE)}
    mm = table.get(1)
    count = sys.getrefcount(mm)
    table[1].close()
    return count


_UNVIEWED = _unviewed_refs()


class Borrower:
    """Other processes' segments, mapped here once and kept while their owner keeps them.

    A borrowed body is a view of the mapping; the views decoded from it (arrays, tensors)
    hold it through that view, and CPython counts each such view's reference to the mapping,
    which is how `unviewed` knows that nothing here views a segment any more.
    """

    def __init__(self) -> None:
        self._maps: dict[int, dict[int, mmap.mmap]] = {}  # owner pid -> seq -> mapping
        self._lent: dict[int, list[int]] = {}  # owner pid -> segments lent here, not yet free
        self.borrowed = 0  # bodies borrowed since the start

    def borrow(self, reference: bytes, owner: int, max_body: int) -> memoryview:
        """A writable view of the body in `owner`'s segment (an H_SHM_BODY reference)."""
        fields = reference.split()
        if len(fields) != 4 or not all(f.isdigit() for f in fields):
            raise BadRequestError(f"malformed {H_SHM_BODY.decode()} header: 4 numbers expected")
        pid, fd, seq, length = map(int, fields)
        if pid != owner:
            raise BadRequestError(f"{H_SHM_BODY.decode()} names another process than the caller")
        if length > max_body:
            raise PayloadTooLargeError(f"request body exceeds {max_body} bytes")
        maps = self._maps.setdefault(owner, {})
        mm = maps.get(seq)
        if mm is None:
            mm = maps[seq] = _map(pid, fd)
        if len(mm) < length:
            raise BadRequestError("the body segment is shorter than the body")
        self._lent.setdefault(owner, []).append(seq)
        self.borrowed += 1
        return memoryview(mm)[:length]

    def unviewed(self, owner: int) -> bytes:
        """`owner`'s segments lent here that nothing views any more: the H_SHM_FREE value to
        send it (each is listed once)."""
        lent, maps = self._lent.get(owner), self._maps.get(owner, {})
        if not lent:
            return b""
        free: list[bytes] = []
        kept: list[int] = []
        for seq in lent:
            mm = maps.get(seq)
            if mm is None:  # forgotten meanwhile
                continue
            if sys.getrefcount(mm) > _UNVIEWED:
                kept.append(seq)
            else:
                free.append(b"%d" % seq)
        self._lent[owner] = kept
        return b",".join(free)

    def drop(self, listed: bytes | None, owner: int) -> None:
        """`owner` let these segments go (its H_SHM_DROP header): unmapped here once unviewed
        (a view still alive keeps its mapping until it goes)."""
        maps = self._maps.get(owner, {})
        for seq in _seqs(listed):
            mm = maps.pop(seq, None)
            if mm is not None:
                with contextlib.suppress(BufferError):
                    mm.close()

    def forget(self, owner: int) -> None:
        """`owner` has exited or was replaced: its segments are unmapped here (once unviewed)."""
        self._lent.pop(owner, None)
        for mm in self._maps.pop(owner, {}).values():
            with contextlib.suppress(BufferError):
                mm.close()


def _map(pid: int, fd: int) -> mmap.mmap:
    """The whole of `pid`'s segment `fd`, mapped shared; anything but a segment is refused."""
    path = f"/proc/{pid}/fd/{fd}"
    try:
        if not os.readlink(path).startswith(f"/memfd:{_NAME}"):
            raise BadRequestError(f"{H_SHM_BODY.decode()} names no body segment")
        handle = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise BadRequestError(f"cannot open the caller's body segment: {exc}") from None
    try:
        size = os.fstat(handle).st_size
        if size <= 0:
            raise BadRequestError("the body segment is empty")
        # Populated: one call maps every page, instead of a fault per page as it is read.
        return mmap.mmap(handle, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    finally:
        os.close(handle)


class SharedMemory:
    """Both sides of lending for one process: what it lends, what it borrows."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.lender = Lender()
        self.borrower = Borrower()
        self._header = b"%d" % self.lender.pid

    def _notes(self, peer: int) -> list[tuple[bytes, bytes]]:
        """What to tell `peer` with the next message: its segments free, ours let go."""
        notes = [(H_SHM, self._header)]
        free = self.borrower.unviewed(peer)
        if free:
            notes.append((H_SHM_FREE, free))
        dropped = self.lender.dropped(peer)
        if dropped:
            notes.append((H_SHM_DROP, dropped))
        return notes

    async def _lend(self, body: Any, peer: int) -> tuple[bytes | None, Any]:
        """A large body lent to `peer`: its reference and the empty body to send instead;
        else (None, the body)."""
        if isinstance(body, BodyStream) or body_length(body) < MIN_LENT:
            return None, body  # small, or a stream's items (as they come, never lent)
        ref = await self.lender.lend(body_parts(body), body_length(body), peer)
        return (ref, b"") if ref is not None else (None, body)

    def _heard(self, headers: dict[bytes, bytes]) -> int | None:
        """The peer's pid, when it lends, with what it told us taken in."""
        pid = headers.get(H_SHM)
        if pid is None or not pid.isdigit():
            return None
        peer = int(pid)
        self.lender.returned(headers.get(H_SHM_FREE), peer)
        self.borrower.drop(headers.get(H_SHM_DROP), peer)
        return peer

    # the caller's side (the local Service's router engine) --------------------------------

    async def request_headers(self, peer: int | None, body: Any) -> tuple[bytes, Any]:
        """Header lines for a request to `peer` (None: not known yet), and the body to write:
        empty when it was lent."""
        if peer is None:
            return H_SHM + b": " + self._header + b"\r\n", body
        notes = self._notes(peer)
        ref, body = await self._lend(body, peer)
        if ref is not None:
            notes.append((H_SHM_BODY, ref))
        return b"".join(name + b": " + value + b"\r\n" for name, value in notes), body

    def reply(self, headers: dict[bytes, bytes], body: Any) -> tuple[int | None, Any]:
        """The replying peer's pid (when it lends) and the reply's body, borrowed if lent."""
        peer = self._heard(headers)
        ref = headers.get(H_SHM_BODY) if peer is not None else None
        if ref is not None:
            body = self.borrower.borrow(ref, peer, 1 << 62)  # type: ignore[arg-type]
        return peer, body

    def replaced(self, old: int) -> None:
        """A peer process is gone (a replica restarted): what it lent us is unmapped."""
        self.borrower.forget(old)

    # the replica's side --------------------------------------------------------------------

    async def serve(self, req: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        """Answer `req` with `handler`, its body borrowed and a large answer lent, when the
        caller lends (its H_SHM header); other requests pass through untouched."""
        peer = self._heard(req.headers)
        if peer is None:
            return await handler(req)
        ref = req.headers.get(H_SHM_BODY)
        if ref is not None:
            req.body = self.borrower.borrow(ref, peer, self.max_body)
        try:
            resp = await handler(req)
        finally:
            req.body = b""  # the request's own view: the arguments' views say if it is free
        # Lent first: an echoed argument, once copied, no longer holds the caller's segment.
        ref, resp.body = await self._lend(resp.body, peer)
        lent = [(H_SHM_BODY, ref)] if ref is not None else []
        resp.headers = [*(resp.headers or ()), *self._notes(peer), *lent]
        return resp

    def close(self) -> None:
        self.lender.close()
