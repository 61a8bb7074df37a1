"""HTTP/1.1 at the router's edge, on raw sockets: whatever the call path, callers are served."""

import json
import re
import socket
import time
from urllib.parse import urlsplit

from tests.integration.procs import Procs

CALL = b'{"args": ["x"], "kwargs": {}}'


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _request(extra: bytes = b"", body: bytes = CALL, version: bytes = b"1.1") -> bytes:
    return (
        b"POST /v1/call/echo HTTP/" + version + b"\r\nhost: kf\r\n"
        b"content-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"\r\n"
        + body
    )


def _read_responses(sock: socket.socket, n: int) -> list[tuple[int, bytes, bytes]]:
    """n complete responses (status, head, body), in the order they arrived."""
    buf = b""
    out = []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(out)} of {n} responses"
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed inside a body"
            rest += chunk
        out.append((int(head.split(b" ", 2)[1]), head, rest[:length]))
        buf = rest[length:]
    return out


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(2)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_pipelined_calls_are_answered_in_order(procs: Procs) -> None:
    router = procs.router(procs.replicas("examples.echo:Echo", 2))
    with _connect(router.url) as sock:
        bodies = [json.dumps({"args": [i], "kwargs": {}}).encode() for i in range(20)]
        sock.sendall(b"".join(_request(body=b) for b in bodies))
        answers = _read_responses(sock, 20)
    assert [json.loads(body)["result"] for _, _, body in answers] == list(range(20))


def test_a_call_sent_a_byte_at_a_time(procs: Procs) -> None:
    router = procs.router(procs.replicas("examples.echo:Echo", 1))
    with _connect(router.url) as sock:
        for byte in _request():
            sock.send(bytes([byte]))
            time.sleep(0.0005)
        [(status, _, body)] = _read_responses(sock, 1)
    assert status == 200 and json.loads(body) == {"result": "x"}


def test_chunked_and_expect_continue_bodies(procs: Procs) -> None:
    router = procs.router(procs.replicas("examples.echo:Echo", 1))
    chunked = (
        b"POST /v1/call/echo HTTP/1.1\r\nhost: kf\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
        + f"{len(CALL):x}".encode()
        + b"\r\n"
        + CALL
        + b"\r\n0\r\n\r\n"
    )
    with _connect(router.url) as sock:
        sock.sendall(chunked)
        [(status, _, body)] = _read_responses(sock, 1)
        assert status == 200 and json.loads(body) == {"result": "x"}
        # And the same connection keeps serving plain calls after it.
        sock.sendall(_request())
        assert _read_responses(sock, 1)[0][0] == 200
    with _connect(router.url) as sock:
        request = _request(b"expect: 100-continue\r\n")
        sock.sendall(request[: -len(CALL)])  # the head only: wait for the go-ahead
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(CALL)
        [(status, _, body)] = _read_responses(sock, 1)
        assert status == 200 and json.loads(body) == {"result": "x"}


def test_http_1_0_and_connection_close_are_honoured(procs: Procs) -> None:
    router = procs.router(procs.replicas("examples.echo:Echo", 1))
    for request in (_request(version=b"1.0"), _request(b"connection: close\r\n")):
        with _connect(router.url) as sock:
            sock.sendall(request)
            [(status, head, body)] = _read_responses(sock, 1)
            assert status == 200 and json.loads(body) == {"result": "x"}
            assert b"connection: close" in head.lower()
            assert _closed(sock)


def _until_closed(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_each_request_gets_one_answer_at_the_edges(procs: Procs) -> None:
    """An upgrade is refused once (not run, then refused); a half-closed caller still gets its
    answer; an oversized body behind a pipelined call waits for that call's answer."""
    router = procs.router(procs.replicas("examples.echo:Echo", 1), "--max-body", "1024")
    with _connect(router.url) as sock:
        sock.sendall(_request(b"connection: upgrade\r\nupgrade: h2c\r\n"))
        answers = _until_closed(sock)
    assert answers.count(b"HTTP/1.1 ") == 1 and answers.startswith(b"HTTP/1.1 400"), answers
    with _connect(router.url) as sock:
        sock.sendall(_request())
        sock.shutdown(socket.SHUT_WR)
        answers = _until_closed(sock)
    assert answers.startswith(b"HTTP/1.1 200") and b'"result":"x"' in answers, answers
    with _connect(router.url) as sock:
        sock.sendall(_request() + _request(body=b"x" * 2000))
        answers = _until_closed(sock)
    assert re.findall(rb"HTTP/1\.1 (\d{3})", answers) == [b"200", b"413"], answers
