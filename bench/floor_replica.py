"""The least a replica can do: every call answered `{"result": "x"}` by a raw uvloop protocol,
with no HTTP parser, no actor, no checks. Not a replica anyone should run: bench/scale.py puts
16 of them behind the same router as 16 real ones, and the broadcast through them is the floor
that the machine and the router set (what no replica code could go below).

Usage: `python bench/floor_replica.py --port N` (KUBEFORGE_TOKEN: the digest it reports).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import uvloop  # noqa: E402

from kubeforge import tokens  # noqa: E402


def _answer(body: bytes) -> bytes:
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


CALL = _answer(b'{"result":"x"}')


class Canned(asyncio.Protocol):
    """Answers each complete request on the connection, in order; reads its length only."""

    def __init__(self, health: bytes) -> None:
        self.health = health
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            head = buf[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(buf) < end + 4 + length:
                break
            assert self.transport is not None
            self.transport.write(self.health if head.startswith(b"get") else CALL)
            buf = buf[end + 4 + length :]
        self.buf = buf


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    ns = parser.parse_args()
    accepted, _ = tokens.from_environ()
    health = _answer(
        json.dumps(
            {
                "status": "ok",
                "name": os.environ.get("KUBEFORGE_REPLICA_NAME", "floor"),
                "instance": secrets.token_hex(4),
                "ready": True,
                "draining": False,
                "in_flight": 0,
                "queued": 0,
                "sessions": 0,
                "max_concurrent_requests": 64,
                "pid": os.getpid(),
                "token_digest": accepted.digest,
            }
        ).encode()
    )
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Canned(health), ns.host, ns.port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
