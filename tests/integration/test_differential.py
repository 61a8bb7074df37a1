"""Differential: the native relay and the Python call path answer every input alike (DESIGN §3).

Two routers run in front of the same replicas, one with the Rust relay (KUBEFORGE_RELAY=native)
and one with the Python call path (KUBEFORGE_RELAY=python). One corpus of raw HTTP requests,
valid and malformed, is sent to both over plain sockets (HTTP clients would normalise it), and
every answer must match: status, body format, error type (`error.type`) or, for a success, the
result (the echo actor's answers are deterministic) or the shape of the body, and whether the
answer closes the connection. A generated part (hypothesis) draws more requests from the same
ingredients. Every read is bounded: a side that hangs is a difference, named by its case.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubeforge import values
from kubeforge.router.sessions import SessionCodec
from tests.integration.procs import Proc, Procs
from tests.unit.test_values import BAD_BODIES, array_ext, message

TOKEN = "diff-token"
MAX_BODY = 2048
REPLICAS = 2
HOST = b"host: kf"
AUTH = f"authorization: Bearer {TOKEN}".encode()
VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "relay.json").read_text())

# Placeholders in request bytes, filled in once the deployment runs (so request bytes are the
# same for both routers): session ids created on each router, a session id with a valid MAC for
# replica 0 that no replica was ever told about, and one for an instance that does not exist
# (a session whose replica was "lost": the router re-pins it).
SID_NATIVE = b"<sid-native>"
SID_PYTHON = b"<sid-python>"
SID_UNREGISTERED = b"<sid-unregistered>"
SID_LOST = b"<sid-lost>"
SID_UPPER = b"<sid-upper-cased>"  # the native router's session id in upper case
FORGED = b"0.abcdef.000000000000.0000000000000000"

WAIT = 2.0  # seconds to wait for an answer before half-closing, and again after
CONNECT_TIMEOUT = 2.0


# --- talking to the routers --------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One response, reduced to what both call paths must agree on."""

    status: int
    fmt: str  # json, msgpack, text, empty, or unparsable
    what: str  # the error type, or the result, or the body's keys
    close: bool  # the response says `connection: close`

    def __str__(self) -> str:
        return f"{self.status} {self.fmt} {self.what}{' (close)' if self.close else ''}"


@dataclass(frozen=True)
class Exchange:
    answers: tuple[Answer, ...]
    end: str  # "" (all answers read), "closed", "timeout" or "refused"
    nudged: bool  # no (complete) answer until the client half-closed its side

    def __str__(self) -> str:
        parts = [str(a) for a in self.answers]
        if self.end:
            parts.append(f"<{self.end}>")
        return " | ".join(parts or ["<nothing>"]) + (" [after half-close]" if self.nudged else "")


def _decode(head: dict[bytes, bytes], body: bytes) -> tuple[str, Any]:
    ctype = head.get(b"content-type", b"").split(b";")[0].strip().lower()
    if not body:
        return "empty", None
    try:
        if ctype == b"application/json":
            return "json", json.loads(body)
        if ctype in (b"application/msgpack", b"application/x-msgpack"):
            return "msgpack", msgpack.unpackb(body, raw=False)
        if ctype == values.CONTENT_TYPE:
            return "binary", values.decode(bytearray(body))
    except (ValueError, msgpack.UnpackException, msgpack.ExtraData):
        return "unparsable", None
    return "text", None


def _reduce(status: int, head: dict[bytes, bytes], body: bytes) -> Answer:
    fmt, doc = _decode(head, body)
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        what = f"error={doc['error'].get('type')}"
    elif isinstance(doc, dict) and "result" in doc:
        # The echo actor answers the same on every replica; a long result is shown by its digest.
        shown = repr(doc["result"])
        if len(shown) > 80:
            digest = hashlib.sha1(shown.encode()).hexdigest()[:12]
            shown = f"{shown[:40]}... ({len(shown)} chars, sha1 {digest})"
        what = f"result={shown}"
    elif isinstance(doc, dict):
        what = f"keys={sorted(doc)}"  # session ids, metrics: the shape only
    else:
        what = type(doc).__name__
    close = b"close" in head.get(b"connection", b"").lower()
    return Answer(status, fmt, what, close)


def _parse(buf: bytes) -> tuple[int, dict[bytes, bytes], int] | None:
    """(status, headers, head length) of the response at the start of `buf`, once complete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError):
        status = 0  # not an HTTP status line: a difference of its own if only one side says it
    head: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        head[name.strip().lower()] = value.strip()
    return status, head, end + 4


def exchange(
    port: int, data: bytes, *, half_close: bool = False, responses: int = 1, pause_at: int = 0
) -> Exchange:
    """Send `data` on a fresh connection and read up to `responses` complete answers.

    With `pause_at`, the first `pause_at` bytes go in a write of their own, a moment before
    the rest (so the server reads them separately).

    If no complete answer came within WAIT seconds, the client half-closes (as if the caller
    gave up sending) and waits WAIT more: a request that makes one side wait for more input
    while the other answers shows as a difference instead of hanging the test.
    """
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT)
    except OSError:
        return Exchange((), "refused", False)
    answers: list[Answer] = []
    buf = b""
    end = ""
    nudged = False
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A server may answer early and close (e.g. 413): then read what it said.
        with contextlib.suppress(OSError):
            if pause_at:
                sock.sendall(data[:pause_at])
                time.sleep(0.05)
            sock.sendall(data[pause_at:])
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + WAIT
        while len(answers) < responses:
            parsed = _parse(buf)
            if parsed is not None:
                status, head, head_len = parsed
                if 100 <= status < 200:  # 100 Continue: not the answer
                    buf = buf[head_len:]
                    continue
                length = int(head.get(b"content-length", b"0") or 0)
                if len(buf) >= head_len + length:
                    answers.append(_reduce(status, head, buf[head_len : head_len + length]))
                    buf = buf[head_len + length :]
                    deadline = time.monotonic() + WAIT
                    continue
            left = deadline - time.monotonic()
            if left <= 0:
                if nudged or half_close:
                    end = "timeout"
                    break
                nudged = True
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + WAIT
                continue
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # reset
                chunk = b""
            if not chunk:
                end = "closed"
                if buf and _parse(buf) is None:
                    end = f"closed after {buf[:40]!r}"
                break
            buf += chunk
    return Exchange(tuple(answers), end, nudged)


# --- the deployment ----------------------------------------------------------------------------


class Deployment:
    """The two routers, and the values of the placeholders in request bytes."""

    def __init__(self, native: Proc, python: Proc, fill: dict[bytes, bytes]) -> None:
        self.native = native
        self.python = python
        self.fill = fill

    def __repr__(self) -> str:  # short, for hypothesis' report of a failing example
        return f"Deployment(native=:{self.native.port}, python=:{self.python.port})"

    def prepare(self, data: bytes) -> bytes:
        for name, value in self.fill.items():
            data = data.replace(name, value)
        return data

    def both(
        self, data: bytes, *, half_close: bool = False, responses: int = 1, pause_at: int = 0
    ) -> Outcomes:
        """The same bytes sent to both routers at once (a hang costs its wait only once)."""
        with ThreadPoolExecutor(2) as pool:
            native, python = pool.map(
                lambda port: exchange(
                    port, data, half_close=half_close, responses=responses, pause_at=pause_at
                ),
                (self.native.port, self.python.port),
            )
        return Outcomes(data, native, python)


@dataclass(frozen=True)
class Outcomes:
    data: bytes
    native: Exchange
    python: Exchange

    @property
    def same(self) -> bool:
        return self.native == self.python

    def report(self, name: str) -> str:
        return (
            f"{name}: the two call paths differ\n  request: {self.data!r}\n"
            f"  native:  {self.native}\n  python:  {self.python}"
        )


def _get(port: int, path: str) -> tuple[int, Any]:
    raw = f"GET {path} HTTP/1.1\r\nhost: kf\r\n".encode() + AUTH + b"\r\n\r\n"
    return _post_raw(port, raw)


def _post_raw(port: int, raw: bytes) -> tuple[int, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        buf = b""
        while (parsed := _parse(buf)) is None or len(buf) < parsed[2] + int(
            parsed[1].get(b"content-length", b"0")
        ):
            chunk = sock.recv(65536)
            assert chunk, f"closed before a full answer: {buf!r}"
            buf += chunk
    status, head, head_len = parsed
    return status, json.loads(buf[head_len : head_len + int(head[b"content-length"])])


def _start_session(port: int) -> str:
    raw = b"POST /v1/sessions HTTP/1.1\r\nhost: kf\r\n" + AUTH + b"\r\ncontent-length: 0\r\n\r\n"
    status, body = _post_raw(port, raw)
    assert status == 201, body
    return str(body["session_id"])


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    procs = Procs(tmp_path_factory.mktemp("differential"), env={"KUBEFORGE_TOKEN": TOKEN})
    try:
        replicas = procs.replicas("examples.echo:Echo", REPLICAS, "--max-body", str(MAX_BODY))
        flags = ("--max-body", str(MAX_BODY))
        # Explicit both ways: the integration tier also runs with KUBEFORGE_RELAY=python set.
        native = procs.router(replicas, *flags, env={"KUBEFORGE_RELAY": "native"})
        python = procs.router(replicas, *flags, env={"KUBEFORGE_RELAY": "python"})
        for proc, kind in ((native, "native"), (python, "python")):
            status, metrics = _get(proc.port, "/v1/metrics")
            assert status == 200, metrics
            assert metrics["relay"]["kind"] == kind, (kind, metrics["relay"])
        codec = SessionCodec(TOKEN)
        status, health = _get(replicas[0].port, "/healthz")
        assert status == 200, health
        fill = {
            SID_NATIVE: _start_session(native.port).encode(),
            SID_PYTHON: _start_session(python.port).encode(),
            SID_UNREGISTERED: codec.new(0, str(health["instance"])).encode(),
            SID_LOST: codec.new(0, "gone-instance").encode(),
        }
        fill[SID_UPPER] = fill[SID_NATIVE].upper()
        yield Deployment(native, python, fill)
    finally:
        procs.cleanup()


# --- the fixed corpus --------------------------------------------------------------------------


def req(
    *headers: bytes,
    method: bytes = b"POST",
    path: bytes = b"/v1/call/echo",
    body: bytes = b'{"args": ["x"]}',
    version: bytes = b"HTTP/1.1",
    auth: bool = True,
    length: bool = True,
    ctype: bytes | None = b"application/json",
) -> bytes:
    """A request: the given header lines plus host, token, content type and length."""
    lines = [method + b" " + path + b" " + version, HOST]
    if auth:
        lines.append(AUTH)
    if ctype is not None:
        lines.append(b"content-type: " + ctype)
    if length:
        lines.append(b"content-length: " + str(len(body)).encode())
    lines += headers
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(body: bytes, size: int = 5) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"


def mp(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    half_close: bool = False  # the request is cut short on purpose: half-close at once
    responses: int = 1  # answers to read (pipelining)
    pause_at: int = 0  # send the first bytes on their own, then the rest
    status: int | None = None  # the status the shared vectors state, where they do


CALL = b'{"args": ["x"]}'
TE = b"transfer-encoding: chunked"
MSGPACK = b"application/msgpack"

CASES: list[Case] = [
    # A plain call and its plain variants: the baseline.
    Case("valid call", req()),
    Case("valid call, kwargs", req(body=b'{"kwargs": {"value": [1, {"a": null}]}}')),
    Case("valid call, empty body", req(body=b"")),
    Case("valid call, no content-length", req(length=False, body=b"")),
    Case("valid call, no content type", req(ctype=None)),
    Case("valid sync endpoint", req(path=b"/v1/call/echo_sync")),
    Case("valid call with query", req(path=b"/v1/call/echo?x=1")),
    Case("percent-encoded endpoint", req(path=b"/v1/call/ech%6f")),
    Case("call_all", req(path=b"/v1/call_all/echo")),
    Case("HTTP/1.0 call", req(version=b"HTTP/1.0")),
    Case("HTTP/1.0 keep-alive call", req(b"connection: keep-alive", version=b"HTTP/1.0")),
    Case("connection: close", req(b"connection: close")),
    Case("connection: keep-alive, close", req(b"connection: keep-alive, close")),
    Case("connection: Close", req(b"connection: Close")),
    Case("connection: close, keep-alive", req(b"connection: close, keep-alive")),
    Case("connection: close with trailing space", req(b"connection: close ")),
    Case(
        "connection twice, keep-alive then close",
        req(b"connection: keep-alive", b"connection: close"),
    ),
    Case("expect: 100-continue", req(b"expect: 100-continue")),
    Case("upper-case header names", req(b"X-KUBEFORGE-TIMEOUT: 5").upper()),
    Case("header value with trailing spaces", req(b"x-kubeforge-timeout: 5   ")),
    Case("token with trailing spaces", req(AUTH + b"  ", auth=False)),
    Case("leading empty line", b"\r\n" + req()),
    # Bad request lines and heads.
    Case("garbage", b"THIS IS NOT HTTP\r\n\r\n"),
    Case("binary garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
    Case("bare LF head, call", req().replace(b"\r\n", b"\n")),
    Case("bare LF head, healthz", b"GET /healthz HTTP/1.1\nhost: kf\n\n"),
    Case("bare LF head, metrics", b"GET /v1/metrics HTTP/1.1\n" + AUTH + b"\n\n"),
    Case("head ended by a bare LF", req(body=b"").replace(b"\r\n\r\n", b"\r\n\n")),
    Case("missing version", b"POST /v1/call/echo\r\n" + AUTH + b"\r\n\r\n"),
    Case("unknown version HTTP/1.2", req(version=b"HTTP/1.2")),
    Case("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    Case("lower-case method", req(method=b"post")),
    Case("unknown method", req(method=b"BREW")),
    Case(
        "unknown method, body still to come",
        req(b"content-length: 40", method=b"BREW", length=False),
    ),
    Case("two spaces in request line", req().replace(b"POST /", b"POST  /", 1)),
    Case("header without colon", req(b"x-broken-header")),
    Case("space before colon", req(b"x-kubeforge-timeout : 5")),
    Case("obs-fold header", req(b"x-a: 1", b" folded")),
    Case("NUL in header value", req(b"x-a: a\x00b")),
    Case("NUL in path", req(path=b"/v1/call/ec\x00ho")),
    Case("NUL in method", req(method=b"PO\x00ST")),
    Case("DEL in header value", req(b"x-a: a\x7fb")),
    Case("non-ASCII header value", req(b"x-a: \xc3\xa9\xff")),
    Case("non-ASCII path", req(path=b"/v1/call/\xc3\xa9")),
    Case("percent-encoded non-ASCII endpoint", req(path=b"/v1/call/%C3%A9")),
    Case("percent-encoded CRLF in path", req(path=b"/v1/call/echo%0d%0aX-Evil:%201")),
    Case("absolute-form target", req(path=b"http://kf/v1/call/echo")),
    Case("upgrade", req(b"connection: upgrade", b"upgrade: h2c")),
    Case("65 headers", req(*(f"x-h{i}: {i}".encode() for i in range(65)))),
    Case("head of 60 KiB", req(b"x-pad: " + b"a" * (60 * 1024))),
    # How a head over 64 KiB is split into reads decides the Python server's answer (and, up to
    # about 130 KiB, the relay's): no case sends one between 64 and 130 KiB. At 200 KiB the
    # relay always answers 431, the Python server when its reads split the head (D9).
    Case("head of 200 KiB", req(b"x-pad: " + b"a" * (200 * 1024))),
    Case("head of 1 MiB", req(b"x-pad: " + b"a" * (1024 * 1024))),
    Case("call sent in two writes", req(), pause_at=40),
    Case("pipelined call sent in two writes", req() + req(), responses=2, pause_at=len(req()) + 5),
    # Odd lengths.
    Case("two equal content-lengths", req(b"content-length: 15")),
    Case("two unequal content-lengths", req(b"content-length: 16") + b" "),
    Case("content-length then chunked", req(TE, body=b"0\r\n\r\n")),
    Case(
        "chunked then content-length",
        req(TE, b"content-length: 5", length=False, body=b"0\r\n\r\n"),
    ),
    Case("content-length +15", req(b"content-length: +15", length=False)),
    Case("content-length 15, 15", req(b"content-length: 15, 15", length=False)),
    Case("content-length -1", req(b"content-length: -1", length=False)),
    Case("content-length hex", req(b"content-length: 0xf", length=False)),
    Case("content-length 015", req(b"content-length: 015", length=False)),
    Case("content-length empty", req(b"content-length:", length=False, body=b"")),
    Case("content-length 2^64", req(b"content-length: 18446744073709551616", length=False)),
    Case("content-length huge", req(b"content-length: " + b"9" * 40, length=False)),
    Case("content-length tab", req(b"content-length:\t15", length=False)),
    Case(
        "body shorter than content-length, then close",
        req(b"content-length: 40", length=False),
        half_close=True,
    ),
    Case("head cut short, then close", req()[:30], half_close=True),
    Case("valid call, then close", req(), half_close=True),
    Case("valid call, connection: close, then close", req(b"connection: close"), half_close=True),
    Case("content-length: 2048 (the limit)", req(body=b'{"args": ["' + b"x" * 2034 + b'"]}')),
    Case("content-length: 2049", req(body=b'{"args": ["' + b"x" * 2035 + b'"]}')),
    Case("oversized body", req(body=b'{"args": ["' + b"x" * 10_000 + b'"]}')),
    Case("oversized content-length, no body", req(b"content-length: 99999", length=False)),
    # Chunked bodies.
    Case("chunked", req(TE, length=False, body=chunked(CALL))),
    Case(
        "chunked, upper-case", req(b"Transfer-Encoding: Chunked", length=False, body=chunked(CALL))
    ),
    Case("chunked, extension", req(TE, length=False, body=b"f;x=y\r\n" + CALL + b"\r\n0\r\n\r\n")),
    Case("chunked, trailer", req(TE, length=False, body=chunked(CALL)[:-2] + b"x-t: 1\r\n\r\n")),
    Case("chunked, bad size", req(TE, length=False, body=b"zz\r\n" + CALL + b"\r\n0\r\n\r\n")),
    Case("chunked, wrong size", req(TE, length=False, body=b"3\r\n" + CALL + b"\r\n0\r\n\r\n")),
    Case("chunked, no last chunk", req(TE, length=False, body=b"f\r\n" + CALL + b"\r\n"), True),
    Case("chunked, oversized", req(TE, length=False, body=chunked(b"x" * 3000, 1000))),
    Case("transfer-encoding gzip", req(b"transfer-encoding: gzip", length=False)),
    Case("transfer-encoding gzip, chunked", req(b"transfer-encoding: gzip, chunked")),
    Case(
        "transfer-encoding on HTTP/1.0",
        req(TE, length=False, body=chunked(CALL), version=b"HTTP/1.0"),
    ),
    # Bodies.
    Case("bad JSON", req(body=b'{"args": [1')),
    Case("body not an object", req(body=b"[1, 2]")),
    Case("body is a string", req(body=b'"x"')),
    Case("unknown key in body", req(body=b'{"argz": []}')),
    Case("args not a list", req(body=b'{"args": 5}')),
    Case("kwargs not an object", req(body=b'{"kwargs": []}')),
    Case("too many args", req(body=b'{"args": [1, 2, 3]}')),
    Case("unknown kwarg", req(body=b'{"kwargs": {"nope": 1}}')),
    Case("too many args, sync endpoint", req(path=b"/v1/call/echo_sync", body=b'{"args": [1, 2]}')),
    Case("non-UTF-8 JSON", req(body=b'{"args": ["\xff"]}')),
    Case("msgpack call", req(ctype=MSGPACK, body=mp({"args": [b"\x00\xff"]}))),
    Case("x-msgpack call", req(ctype=b"application/x-msgpack", body=mp({"args": [1]}))),
    Case("msgpack with parameters", req(ctype=b"application/msgpack; q=1", body=mp({"args": [1]}))),
    Case("bad msgpack", req(ctype=MSGPACK, body=b"\xc1\xc1")),
    Case("msgpack with extra data", req(ctype=MSGPACK, body=mp({}) + b"\x01")),
    Case("msgpack, args not a list", req(ctype=MSGPACK, body=mp({"args": 1}))),
    Case("msgpack, too many args", req(ctype=MSGPACK, body=mp({"args": [1, 2, 3]}))),
    Case("msgpack, non-string kwargs", req(ctype=MSGPACK, body=mp({"kwargs": {1: 2}}))),
    Case("msgpack, unknown endpoint", req(ctype=MSGPACK, path=b"/v1/call/nope")),
    Case("msgpack, wrong token", req(b"authorization: Bearer no", ctype=MSGPACK, auth=False)),
    Case("msgpack, forged session", req(b"x-kubeforge-session: " + FORGED, ctype=MSGPACK)),
    Case("msgpack, oversized", req(ctype=MSGPACK, body=mp({"args": ["x" * 3000]}))),
    Case("msgpack, bad timeout", req(b"x-kubeforge-timeout: soon", ctype=MSGPACK)),
    Case("msgpack body, JSON content type", req(body=mp({"args": [1]}))),
    Case("garbage content type", req(ctype=b"\x01garbage")),
    Case("empty content type", req(ctype=b"")),
    Case("two content types", req(b"content-type: application/msgpack")),
    # Paths.
    Case("unknown endpoint", req(path=b"/v1/call/nope")),
    Case("endpoint not an identifier", req(path=b"/v1/call/1echo")),
    Case("endpoint with a dash", req(path=b"/v1/call/ec-ho")),
    Case("empty endpoint", req(path=b"/v1/call/")),
    Case("nested endpoint path", req(path=b"/v1/call/echo/x")),
    Case("private endpoint", req(path=b"/v1/call/__init__")),
    Case("endpoint with fragment", req(path=b"/v1/call/echo#x")),
    Case("path without the slash", req(path=b"/v1/callecho")),
    Case("GET on a call path", req(method=b"GET", body=b"")),
    Case("PUT on a call path", req(method=b"PUT")),
    Case("HEAD on a call path", req(method=b"HEAD", body=b"")),
    Case("unknown /v1 path", req(path=b"/v1/nope", body=b"")),
    Case("unknown /v1 path, GET", req(method=b"GET", path=b"/v1/nope", body=b"")),
    Case("unknown path", req(path=b"/nope")),
    Case("call_all, unknown endpoint", req(path=b"/v1/call_all/nope")),
    Case("call_all, not an identifier", req(path=b"/v1/call_all/a%20b")),
    Case("call_all, endpoint with a query", req(path=b"/v1/call_all/echo?x=1")),
    Case("call_all, empty endpoint", req(path=b"/v1/call_all/")),
    Case(
        "call_all, wrong token",
        req(b"authorization: Bearer no", path=b"/v1/call_all/echo", auth=False),
    ),
    Case("call_all, no token", req(path=b"/v1/call_all/echo", auth=False)),
    Case("call_all, bad JSON", req(path=b"/v1/call_all/echo", body=b"{")),
    Case("call_all, connection: close", req(b"connection: close", path=b"/v1/call_all/echo")),
    Case(
        "call_all, pipelined twice",
        req(path=b"/v1/call_all/echo") + req(path=b"/v1/call_all/echo_sync"),
        responses=2,
    ),
    Case(
        "msgpack call_all",
        req(ctype=MSGPACK, path=b"/v1/call_all/echo", body=mp({"args": [[1, "é"]]})),
    ),
    Case(
        "msgpack call_all, unknown endpoint",
        req(ctype=MSGPACK, path=b"/v1/call_all/nope", body=mp({})),
    ),
    Case(
        "msgpack call_all, bad msgpack", req(ctype=MSGPACK, path=b"/v1/call_all/echo", body=b"\xc1")
    ),
    Case("GET /v1/metrics", req(method=b"GET", path=b"/v1/metrics", body=b"")),
    Case("GET /v1/replicas", req(method=b"GET", path=b"/v1/replicas", body=b"")),
    Case("GET /healthz", req(method=b"GET", path=b"/healthz", body=b"", auth=False)),
    Case("POST /healthz", req(path=b"/healthz")),
    Case("DELETE a forged session", req(method=b"DELETE", path=b"/v1/sessions/" + FORGED)),
    Case("POST /v1/sessions", req(path=b"/v1/sessions", body=b"")),
    # Tokens.
    Case("missing token", req(auth=False)),
    Case("wrong token", req(b"authorization: Bearer nope", auth=False)),
    Case("lower-case scheme", req(f"authorization: bearer {TOKEN}".encode(), auth=False)),
    Case("token without scheme", req(f"authorization: {TOKEN}".encode(), auth=False)),
    Case("empty authorization", req(b"authorization:", auth=False)),
    Case("wrong then right token", req(b"authorization: Bearer nope", AUTH, auth=False)),
    Case("right then wrong token", req(b"authorization: Bearer nope")),
    Case("right token twice", req(AUTH)),
    Case("missing token, unknown endpoint", req(path=b"/v1/call/nope", auth=False)),
    Case("missing token, bad path", req(path=b"/v1/call/a%20b", auth=False)),
    Case("missing token, GET on call path", req(method=b"GET", auth=False, body=b"")),
    Case("missing token, metrics", req(method=b"GET", path=b"/v1/metrics", auth=False, body=b"")),
    Case("missing token, oversized", req(auth=False, body=b"x" * 5000)),
    Case("missing token, bad JSON", req(auth=False, body=b"{")),
    # Sessions.
    Case("session from the native router", req(b"x-kubeforge-session: " + SID_NATIVE)),
    Case("session from the python router", req(b"x-kubeforge-session: " + SID_PYTHON)),
    Case("session never registered", req(b"x-kubeforge-session: " + SID_UNREGISTERED)),
    Case("session of a lost replica", req(b"x-kubeforge-session: " + SID_LOST)),
    Case(
        "session of a lost replica, moved: error",
        req(b"x-kubeforge-session: " + SID_LOST, b"x-kubeforge-session-moved: error"),
    ),
    Case("forged session", req(b"x-kubeforge-session: " + FORGED)),
    Case("real session, trailing space", req(b"x-kubeforge-session: " + SID_NATIVE + b" ")),
    Case("real session, trailing tab", req(b"x-kubeforge-session: " + SID_PYTHON + b"\t")),
    Case("real session, leading tab", req(b"x-kubeforge-session:\t" + SID_PYTHON)),
    Case("garbled session", req(b"x-kubeforge-session: " + SID_NATIVE + b"x")),
    Case("upper-cased session", req(b"X-KUBEFORGE-SESSION: " + SID_UPPER)),
    Case("empty session", req(b"x-kubeforge-session:")),
    Case("non-UTF-8 session", req(b"x-kubeforge-session: \xff\xfe")),
    Case(
        "session header twice, same id",
        req(b"x-kubeforge-session: " + SID_NATIVE, b"x-kubeforge-session: " + SID_NATIVE),
    ),
    Case(
        "session header twice, forged then real",
        req(b"x-kubeforge-session: " + FORGED, b"x-kubeforge-session: " + SID_NATIVE),
    ),
    Case(
        "session header twice, real then forged",
        req(b"x-kubeforge-session: " + SID_NATIVE, b"x-kubeforge-session: " + FORGED),
    ),
    Case("real session, wrong token", req(b"x-kubeforge-session: " + SID_NATIVE, auth=False)),
    Case(
        "real session, unknown endpoint",
        req(b"x-kubeforge-session: " + SID_PYTHON, path=b"/v1/call/nope"),
    ),
    Case(
        "real session, msgpack error",
        req(b"x-kubeforge-session: " + SID_PYTHON, ctype=MSGPACK, body=mp({"args": 1})),
    ),
    # Other headers.
    Case("timeout 5", req(b"x-kubeforge-timeout: 5")),
    Case("timeout garbage", req(b"x-kubeforge-timeout: soon")),
    Case("timeout empty", req(b"x-kubeforge-timeout:")),
    Case("timeout negative", req(b"x-kubeforge-timeout: -1")),
    Case("timeout nan", req(b"x-kubeforge-timeout: nan")),
    Case("timeout twice", req(b"x-kubeforge-timeout: 5", b"x-kubeforge-timeout: soon")),
    Case("delivery at-most-once", req(b"x-kubeforge-delivery: at-most-once")),
    Case("delivery garbage", req(b"x-kubeforge-delivery: \x01")),
    Case(
        "forged relay headers",
        req(b"x-kubeforge-relay-failed: 0 connect", b"x-kubeforge-relay-secret: guess"),
    ),
    Case("forged relay pass", req(b"x-kubeforge-relay-pass: 1")),
    # Pipelining: several requests in one write, answered in order.
    Case("pipelined: two calls", req() + req(), responses=2),
    Case("pipelined: three calls, second bad", req() + req(body=b"[") + req(), responses=3),
    Case("pipelined: call then bare-LF call", req() + req().replace(b"\r\n", b"\n"), responses=2),
    Case("pipelined: call then head cut short", req() + req()[:30], half_close=True, responses=2),
    Case("pipelined: call then garbage", req() + b"GARBAGE\r\n\r\n", responses=2),
    Case("pipelined: call then bad JSON", req() + req(body=b"{"), responses=2),
    Case("pipelined: bad token then call", req(auth=False) + req(), responses=2),
    Case(
        "pipelined: forged session then call",
        req(b"x-kubeforge-session: " + FORGED) + req(),
        responses=2,
    ),
    Case("pipelined: close then call", req(b"connection: close") + req(), responses=2),
    Case(
        "pipelined: keep-alive, close then call",
        req(b"connection: keep-alive, close") + req(),
        responses=2,
    ),
    Case("pipelined: HTTP/1.0 then call", req(version=b"HTTP/1.0") + req(), responses=2),
    Case(
        "pipelined: HTTP/1.0 keep-alive then call",
        req(b"connection: keep-alive", version=b"HTTP/1.0") + req(),
        responses=2,
    ),
    Case(
        "pipelined: chunked then call",
        req(TE, length=False, body=chunked(CALL)) + req(),
        responses=2,
    ),
    Case("pipelined: oversized then call", req(body=b"x" * 3000) + req(), responses=2),
    Case(
        "pipelined: body longer than its length",
        req(b"content-length: 2", length=False),
        responses=2,
    ),
    Case(
        "pipelined: metrics then call",
        req(method=b"GET", path=b"/v1/metrics", body=b"") + req(),
        responses=2,
    ),
]


# kubeforge's binary format (issue 21): valid calls, and every malformed body of the unit
# corpus, sent as a call: both paths relay the bytes and the replica answers 400 with the reason.
BINARY = values.CONTENT_TYPE


def binary_call(value: Any) -> bytes:
    return values.encode({"args": [value], "kwargs": {}}).tobytes()


CASES += [
    Case(
        "binary call, float16 array",
        req(
            ctype=BINARY,
            body=binary_call(np.arange(8, dtype="float16").reshape(2, 4)),
        ),
    ),
    Case("binary call, tuple and bytes", req(ctype=BINARY, body=binary_call((1, b"\x00" * 300)))),
    Case(
        "binary call_all, unknown endpoint",
        req(path=b"/v1/call_all/nope", ctype=BINARY, body=binary_call(1)),
    ),
    Case(
        "binary call_all",
        req(path=b"/v1/call_all/echo", ctype=BINARY, body=binary_call([1.5, None])),
    ),
    Case(
        "binary body past maxBodySize", req(ctype=BINARY, body=binary_call(b"x" * 3000)), status=413
    ),
    Case(
        "binary body as its call",
        req(ctype=BINARY, body=message({"args": [array_ext("float32", [3, 3], b"\0" * 8)]})),
        status=400,
    ),
    *(
        Case(f"binary body: {name}", req(ctype=BINARY, body=body), status=400)
        for name, body in sorted(BAD_BODIES.items())
        if len(body) <= MAX_BODY
    ),
]


def _with_token(raw: str) -> bytes:
    """A vector request with the deployment's token added after its request line."""
    line, _, rest = raw.encode().partition(b"\r\n")
    return line + b"\r\n" + AUTH + b"\r\n" + rest


def _vector_name(i: int, raw: str) -> str:
    head = raw.split("\r\n\r\n")[0].split("\r\n")[2:]  # the lines after request line and host
    return f"vector {i}: " + " | ".join(head)


CASES += [
    Case(_vector_name(i, c["request"]), _with_token(c["request"]), status=c["status"])
    for i, c in enumerate(VECTORS["requests"])
]

# Cases where the two paths once differed, with the answer both now give (first answer).
DECIDED: dict[str, int] = {
    "connection: keep-alive, close": 200,  # `close` in a token list closes
    "token with trailing spaces": 200,  # optional whitespace is not part of a value
    "real session, trailing tab": 200,
    "bare LF head, call": 400,  # bare-LF line ends are refused
    "head ended by a bare LF": 400,
    "percent-encoded non-ASCII endpoint": 404,  # endpoint names are ASCII identifiers
    "head of 200 KiB": 431,  # however the head arrives
    "unknown method, body still to come": 400,
    "valid call, then close": 200,  # a half-closed peer still gets its answers
    "pipelined: call then garbage": 200,  # answered in order, then the 400
    "pipelined: close then call": 200,  # bytes after `connection: close` are dropped
    "pipelined: HTTP/1.0 keep-alive then call": 200,
    "upgrade": 400,  # refused instead of answered (once, not a 200 and then a 400)
}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_both_call_paths_answer_alike(deployment: Deployment, case: Case) -> None:
    out = deployment.both(
        deployment.prepare(case.data),
        half_close=case.half_close,
        responses=case.responses,
        pause_at=case.pause_at,
    )
    assert out.same, out.report(case.name)
    want = case.status if case.status is not None else DECIDED.get(case.name)
    if want is not None:
        got = out.native.answers[0].status if out.native.answers else None
        assert got == want, f"{case.name}: expected {want}: {out.native}"


# --- the generated part ------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=5,
)
ARGS = st.lists(JSON_VALUES, max_size=2)
KWARGS = st.dictionaries(st.sampled_from(["value", "nope"]), JSON_VALUES, max_size=1)
BODIES = st.one_of(
    st.builds(lambda a, k: json.dumps({"args": a, "kwargs": k}).encode(), ARGS, KWARGS),
    st.builds(lambda a: json.dumps({"args": a}).encode(), ARGS),
    st.builds(lambda a, k: mp({"args": a, "kwargs": k}), ARGS, KWARGS),
    st.sampled_from(
        [b"", b"{", b"[1]", b'{"args": 5}', b'{"kwargs": []}', b'{"argz": 1}', b"\xc1", b"null"]
    ),
    st.binary(max_size=40),
    st.integers(MAX_BODY - 20, MAX_BODY + 20).map(lambda n: b'{"args": ["' + b"x" * n + b'"]}'),
)
METHODS = st.sampled_from([b"POST"] * 8 + [b"GET", b"PUT", b"DELETE", b"HEAD", b"post", b"BREW"])
PATHS = st.one_of(
    st.sampled_from(
        [b"/v1/call/echo"] * 6
        + [
            b"/v1/call/echo_sync",
            b"/v1/call_all/echo",
            b"/v1/call/",
            b"/v1/sessions",
            b"/v1/sessions/" + FORGED,
            b"/v1/metrics",
            b"/v1/nope",
            b"/healthz",
        ]
    ),
    st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,10}\Z").map(lambda s: b"/v1/call/" + s.encode()),
    st.binary(max_size=8).map(lambda b: b"/v1/call/" + b),
    st.binary(max_size=6).map(lambda b: b"/v1/call/" + quote_from_bytes(b, safe="").encode()),
)
QUERIES = st.sampled_from([b""] * 6 + [b"?x=1", b"?", b"#f"])
VERSIONS = st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0"])


def _one_of_lines(*options: list[bytes], absent: int = 3) -> st.SearchStrategy[list[bytes]]:
    """Header lines: absent (weighted `absent`), or one of `options` (each a list of lines)."""
    return st.sampled_from([[]] * absent + list(options))


def _header(name: bytes, *values: bytes, absent: int = 3) -> st.SearchStrategy[list[bytes]]:
    return _one_of_lines(*([name + b": " + v] for v in values), absent=absent)


WRONG = b"authorization: Bearer nope"
HEADER_GROUPS = [
    _one_of_lines(
        *[[AUTH]] * 6,
        [WRONG],
        [AUTH + b" "],
        [f"authorization: bearer {TOKEN}".encode()],
        [WRONG, AUTH],
        [AUTH, WRONG],
        absent=1,
    ),
    _header(
        b"content-type",
        b"application/json",
        MSGPACK,
        b"application/x-msgpack",
        b"application/msgpack; charset=utf-8",
        b"text/plain",
        b"\x01",
        b"",
    ),
    _header(
        b"x-kubeforge-session",
        SID_NATIVE,
        SID_PYTHON,
        SID_UNREGISTERED,
        SID_LOST,
        SID_UPPER,
        FORGED,
        SID_PYTHON + b"x",
        SID_NATIVE + b" ",
        b"",
        b"\xff",
    ),
    _one_of_lines(
        [b"x-kubeforge-session: " + FORGED, b"x-kubeforge-session: " + SID_PYTHON],
        [b"x-kubeforge-session: " + SID_PYTHON, b"x-kubeforge-session: " + FORGED],
        absent=12,
    ),
    _header(
        b"x-kubeforge-timeout", b"5", b"0.5", b"-1", b"soon", b"nan", b"inf", b"1e999", b"", b"5 "
    ),
    _header(b"x-kubeforge-delivery", b"at-most-once", b"sometimes"),
    _header(b"x-kubeforge-session-moved", b"error", b"new-id"),
    _header(b"connection", b"close", b"keep-alive", b"keep-alive, close", b"Close", b"upgrade"),
    _header(b"expect", b"100-continue", absent=8),
    _one_of_lines(
        [b"x-kubeforge-relay-failed: 0 connect", b"x-kubeforge-relay-secret: guess"],
        [b"upgrade: h2c"],
        [b"x-pad: " + b"a" * 1000],
        absent=8,
    ),
    st.one_of(
        st.just([]),
        st.tuples(
            st.from_regex(r"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}\Z"), st.binary(max_size=12)
        ).map(lambda nv: [nv[0].encode() + b": " + nv[1]]),
    ),
]
FRAMINGS = st.sampled_from(
    ["length"] * 8
    + ["none", "short", "long", "twice", "unequal", "plus", "list", "hex", "negative"]
    + ["chunked"] * 3
    + ["chunked-bad", "length+chunked", "chunked+length", "gzip"]
)
GENERATED_EXAMPLES = 1000
BAD_CHUNKS = [b"zz\r\n", b"3\r\nabcdef\r\n0\r\n\r\n", b"-1\r\n", b"1\r\nab0\r\n\r\n"]


@dataclass(frozen=True)
class Generated:
    data: bytes
    half_close: bool


@st.composite
def generated_requests(draw: st.DrawFn) -> Generated:
    """A request drawn from the ingredients above; `half_close` when its body is cut short."""
    method, path, query, version = draw(METHODS), draw(PATHS), draw(QUERIES), draw(VERSIONS)
    headers = [line for group in HEADER_GROUPS for line in draw(group)]
    body = draw(BODIES)
    framing = draw(FRAMINGS)
    n = len(body)
    half_close = False
    if framing == "length":
        headers.append(b"content-length: %d" % n)
    elif framing == "short":  # the rest of the body reads as a second (pipelined) request
        headers.append(b"content-length: %d" % max(0, n - draw(st.integers(1, 5))))
    elif framing == "long":
        headers.append(b"content-length: %d" % (n + draw(st.integers(1, 5))))
        half_close = True
    elif framing == "twice":
        headers += [b"content-length: %d" % n] * 2
    elif framing == "unequal":
        headers += [b"content-length: %d" % n, b"content-length: %d" % (n + 1)]
    elif framing == "plus":
        headers.append(b"content-length: +%d" % n)
    elif framing == "list":
        headers.append(b"content-length: %d, %d" % (n, n))
    elif framing == "hex":
        headers.append(b"content-length: 0x%x" % n)
    elif framing == "negative":
        headers.append(b"content-length: -%d" % n)
    elif framing in ("chunked", "length+chunked", "chunked+length"):
        size = draw(st.integers(1, 64))
        if framing == "length+chunked":
            headers.append(b"content-length: %d" % n)
        headers.append(TE)
        if framing == "chunked+length":
            headers.append(b"content-length: %d" % n)
        body = chunked(body, size)
    elif framing == "chunked-bad":
        headers.append(TE)
        body = draw(st.sampled_from(BAD_CHUNKS))
        half_close = True  # some of these make a server wait for more
    elif framing == "gzip":
        headers.append(b"transfer-encoding: gzip")
    headers = draw(st.permutations(headers))
    eol = draw(st.sampled_from([b"\r\n"] * 12 + [b"\n"]))
    head = [method + b" " + path + query + b" " + version, HOST, *headers]
    return Generated(eol.join(head) + eol + eol + body, half_close)


@settings(max_examples=GENERATED_EXAMPLES, deadline=None, derandomize=True, database=None)
@given(request=generated_requests())
def test_generated_requests_are_answered_alike(deployment: Deployment, request: Generated) -> None:
    """Reproducible (derandomized, no example database): a failure names the request bytes."""
    data = deployment.prepare(request.data)
    out = deployment.both(data, half_close=request.half_close)
    assert out.same, out.report("generated")


def test_both_routers_still_serve_and_took_their_paths(deployment: Deployment) -> None:
    """After the corpus: both routers are up, and each answers calls on the path it says: the
    native relay relays a plain call itself and hands a forged session to Python."""
    for proc, kind in ((deployment.native, "native"), (deployment.python, "python")):
        assert proc.alive(), proc.log_text()
        before = _get(proc.port, "/v1/metrics")[1]["relay"]
        assert exchange(proc.port, req()).answers[0].status == 200
        forged = exchange(proc.port, req(b"x-kubeforge-session: " + FORGED))
        assert forged.answers[0].status == 404
        status, metrics = _get(proc.port, "/v1/metrics")
        assert status == 200, metrics
        after = metrics["relay"]
        assert before["kind"] == after["kind"] == kind, (kind, after)
        if kind == "native":
            assert after["relayed"] == before["relayed"] + 1, (before, after)
            assert after["handed_over"] == before["handed_over"] + 1, (before, after)
