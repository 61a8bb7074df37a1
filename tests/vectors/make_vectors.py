"""Writes relay.json: test vectors that pytest (tests/unit/test_vectors.py) and the relay's
`cargo test` both check, so the Python engine and the Rust relay read session ids and replica
answers the same way. Run it again only to add vectors; the MACs come from Python's codec.

    python tests/vectors/make_vectors.py > tests/vectors/relay.json
"""

from __future__ import annotations

import json

from kubeforge.router.sessions import SessionCodec

KEY = "vector-token"


def sessions() -> list[dict[str, object]]:
    codec = SessionCodec(KEY)
    good = [
        (0, "a1b2c3d4"),
        (7, "Pod-Instance-9"),
        (123456, "x" * 64),
    ]
    out: list[dict[str, object]] = []
    for index, instance in good:
        sid = codec.new(index, instance)
        out.append({"id": sid, "valid": True, "index": index, "instance": instance})
    sid = str(out[0]["id"])
    body, mac = sid.rsplit(".", 1)
    bad = {
        "wrong MAC": f"{body}.{'0' * 16}",
        "upper-case MAC": f"{body}.{mac.upper()}",
        "short MAC": f"{body}.{mac[:15]}",
        "trailing newline": sid + "\n",
        "extra part": f"0.x.{body.split('.')[2]}.extra.{mac}",
        "index too long": SessionCodec(KEY).new(1234567, "a"),
        "instance with a dot-free bad char": SessionCodec(KEY).new(1, "a_b"),
        "instance too long": SessionCodec(KEY).new(1, "y" * 65),
        "non-hex nonce": f"0.a1b2c3d4.zzzzzzzzzzzz.{mac}",
        "signed with another key": SessionCodec("other").new(0, "a1b2c3d4"),
        "empty": "",
        "not ASCII": f"0.a1b2c3d4.{body.split('.')[2]}.{mac[:15]}é",
    }
    out += [{"id": v, "valid": False, "why": k} for k, v in bad.items()]
    return out


def answers() -> list[dict[str, object]]:
    def head(status: str, *lines: str) -> str:
        return "\r\n".join([f"HTTP/1.1 {status}", *lines, "content-length: 2", "", "{}"])

    return [
        {
            "response": head("503 Service Unavailable", "x-kubeforge-retryable: OverloadedError"),
            "report": "refused OverloadedError",
            "outcome": "overloaded",
        },
        {
            "response": head("503 Service Unavailable", "x-kubeforge-retryable: DrainingError"),
            "report": "refused DrainingError",
            "outcome": "draining",
        },
        {"response": head("503 Service Unavailable"), "report": None, "outcome": None},
        {
            "response": head("503 Service Unavailable", "x-kubeforge-retryable: "),
            "report": None,
            "outcome": None,
        },
        {"response": head("200 OK"), "report": None, "outcome": None},
        {
            "response": head("500 Internal Server Error", "x-kubeforge-retryable: OverloadedError"),
            "report": None,
            "outcome": None,
        },
    ]


def requests() -> list[dict[str, object]]:
    """Request heads: whether the relay takes the call itself (`relay`) or hands the connection
    to Python (`handover`), and the status both call paths must answer (`status`, with a replica
    `echo` endpoint behind them and no token)."""

    def call(*lines: str, body: str = "{}") -> str:
        return "\r\n".join(["POST /v1/call/echo HTTP/1.1", "host: r", *lines, "", body])

    n = len("{}")
    return [
        {"request": call(f"content-length: {n}"), "relay": "relay", "status": 200},
        {
            "request": call(f"content-length: {n}", f"content-length: {n}"),
            "relay": "handover",
            "status": 400,
        },
        {
            "request": call(f"content-length: {n}", f"content-length: {n + 1}", body="{} "),
            "relay": "handover",
            "status": 400,
        },
        {
            "request": call(f"content-length: {n}", "transfer-encoding: chunked", body="0\r\n\r\n"),
            "relay": "handover",
            "status": 400,
        },
        {
            "request": call("transfer-encoding: chunked", f"content-length: {n}", body="0\r\n\r\n"),
            "relay": "handover",
            "status": 400,
        },
        {"request": call(f"content-length: +{n}"), "relay": "handover", "status": 400},
        {"request": call(f"content-length: {n}, {n}"), "relay": "handover", "status": 400},
        {
            "request": call(
                f"content-length: {n}", "x-kubeforge-session: a", "x-kubeforge-session: b"
            ),
            "relay": "handover",
            "status": 400,  # either could be a session the caller names: which one is unclear
            "parser": False,  # refused by the server's header check, not by llhttp
        },
        {
            "request": call(f"content-length: {n}", "content-type: a", "content-type: b"),
            "relay": "handover",
            "status": 200,
        },
    ]


if __name__ == "__main__":
    doc = {
        "key": KEY,
        "sessions": sessions(),
        "answers": answers(),
        "requests": requests(),
    }
    print(json.dumps(doc, indent=1, ensure_ascii=False))
