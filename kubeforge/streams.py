"""How a streaming endpoint's items travel (`POST /v1/stream/{endpoint}`): frames inside a
chunked HTTP body. Pure: the replica writes frames, callers read them, and the router passes
the bytes on without looking inside.

A frame is a 5-byte head, the payload's length (u32, little-endian) and its kind (u8), then the
payload: an item (the value in the call's body format, as a call's `result` would be), an error
(`{"error": {...}}` in that format: the generator raised, or a deadline passed, after the items
before it), or the end (empty). Frames are self-delimiting, so chunk boundaries mean nothing
and a proxy may re-chunk freely. A stream that stops before its end frame was cut: the replica
or a connection on the way was lost, and the caller says so.

Server-Sent Events (`Accept: text/event-stream`, for curl and browsers) carry the same three
kinds as events: `data: <item as JSON>`, `event: error`, `event: end`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from kubeforge.contract import JSON_MEDIA, STREAM_MEDIA

ITEM, ERROR, END = 0, 1, 2
KINDS = (ITEM, ERROR, END)
HEAD = struct.Struct("<IB")
MAX_PAYLOAD = (1 << 32) - 1
# The reply's content type names the framing, and the items' format after it.
CONTENT_TYPE = STREAM_MEDIA
SSE = b"text/event-stream"


class FrameError(ValueError):
    """Bytes that are not a stream of frames."""


def frame(kind: int, payload: Any = b"") -> list[Any]:
    """One frame as the parts to write: its head, then the payload's own buffers."""
    parts = list(payload.parts) if hasattr(payload, "parts") else [payload]
    length = sum(memoryview(p).nbytes for p in parts)
    if length > MAX_PAYLOAD:
        raise ValueError(f"a stream item is {length} bytes; at most {MAX_PAYLOAD} fit a frame")
    return [HEAD.pack(length, kind), *parts]


def content_type(item_type: bytes) -> bytes:
    """`application/vnd.kubeforge.stream; items=<the items' content type>`."""
    return CONTENT_TYPE + b"; items=" + item_type


def item_type(stream_type: bytes | None) -> bytes | None:
    """The items' content type named by a stream reply's content type (None: not a stream)."""
    if not stream_type:
        return None
    media, _, params = stream_type.partition(b";")
    if media.strip().lower() != CONTENT_TYPE:
        return None
    for param in params.split(b";"):
        name, _, value = param.partition(b"=")
        if name.strip().lower() == b"items":
            return value.strip()
    return JSON_MEDIA


class FrameReader:
    """Frames out of bytes that arrive in pieces of any size. Payloads come out as bytearrays
    of their own (the binary format decodes arrays as writable views of them)."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._kind = -1
        self._payload: bytearray | None = None
        self._filled = 0
        self.ended = False

    @property
    def mid_frame(self) -> bool:
        """Part of a frame has arrived, not all of it."""
        return bool(self._head) or self._payload is not None

    def feed(self, data: Any) -> Iterator[tuple[int, bytearray]]:
        view = memoryview(data).cast("B")
        at = 0
        while at < len(view):
            if self.ended:
                raise FrameError("bytes after the end frame")
            if self._payload is None:
                need = HEAD.size - len(self._head)
                self._head += view[at : at + need]
                at += min(need, len(view) - at)
                if len(self._head) < HEAD.size:
                    return
                length, kind = HEAD.unpack(self._head)
                self._head.clear()
                if kind not in KINDS:
                    raise FrameError(f"unknown frame kind {kind}")
                self._kind, self._payload, self._filled = kind, bytearray(length), 0
            take = min(len(self._payload) - self._filled, len(view) - at)
            self._payload[self._filled : self._filled + take] = view[at : at + take]
            self._filled += take
            at += take
            if self._filled == len(self._payload):
                kind, payload, self._payload = self._kind, self._payload, None
                self.ended = kind != ITEM
                yield kind, payload


def sse_event(kind: int, payload: bytes) -> bytes:
    """One Server-Sent Event for a frame whose payload is JSON (which never holds a raw line
    break: json.dumps escapes them)."""
    if kind == ITEM:
        return b"data: " + payload + b"\n\n"
    if kind == ERROR:
        return b"event: error\ndata: " + payload + b"\n\n"
    return b"event: end\ndata: {}\n\n"
