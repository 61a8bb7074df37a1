"""The native relay's broadcast answer (relay/src/broadcast.rs) against Python's: the envelope it
splices from the replicas' replies is, byte for byte, what the engine writes after decoding
them, in every body format; replies it does not splice are left to Python (None)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from kubeforge import _relay, values, wire  # type: ignore[attr-defined]
from kubeforge.errors import KubeforgeError, UnknownEndpointError
from kubeforge.http.server import Response, render
from kubeforge.replica.streaming import encode_result
from kubeforge.router.engine import Router

FORMATS = (wire.FMT_JSON, wire.FMT_MSGPACK, wire.FMT_BINARY)
RESULTS: list[Any] = [
    None,
    0,
    -(2**63),
    2**64 - 1,
    1.5,
    math.inf,
    "",
    'é " \\ \n \u2028 \U0001f600',
    [1, [2, {"a": None}]],
    {"k": [True, False], "": 0.1},
    list(range(40)),
    "x" * 70_000,  # past the size the relay copies: written from its own buffer
]


def _response(resp: Response) -> bytes:
    return render(resp, keep_alive=True)


def _reply(value: Any, fmt: str) -> bytes:
    """A replica's answer to the call, as the replica writes it."""
    body = encode_result({"result": value}, "echo", fmt)
    if isinstance(body, values.Encoded):
        body = body.tobytes()
    return _response(Response(200, body, wire.content_type(fmt)))


def _python_envelope(replies: list[bytes], names: list[str], fmt: str) -> bytes:
    """What the engine answers from the same replies (`Router._answer_of` + `_assemble`)."""
    router = Router.__new__(Router)  # both read nothing of the router for successes
    answers = []
    for name, raw in zip(names, replies, strict=True):
        head, _, body = raw.partition(b"\r\n\r\n")
        ctype = wire.content_type(fmt)
        assert b"content-type: " + ctype in head
        reply = Router._part_of(0, _Resp(200, ctype, body))
        answers.append((name, router._answer_of(0, reply)))
    resp = router._assemble(answers, fmt)
    body = resp.body.tobytes() if isinstance(resp.body, values.Encoded) else resp.body
    return bytes(body)


class _Resp:
    """A ClientResponse's face, for `Router._part_of`."""

    def __init__(self, status: int, ctype: bytes, body: bytes) -> None:
        self.status, self.body = status, body
        self.headers = {wire.H_CONTENT_TYPE: ctype}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("replicas", [1, 2, 15, 16, 17, 130])
def test_the_relays_envelope_is_the_engines(fmt: str, replicas: int) -> None:
    names = [f"svc-{i}" if i % 3 else f'ünïcode "{i}"' for i in range(replicas)]
    replies = [_reply(RESULTS[i % len(RESULTS)], fmt) for i in range(replicas)]
    got = _relay.broadcast_envelope(wire.content_type(fmt), names, replies)
    assert got is not None
    want = _python_envelope(replies, names, fmt)
    assert got == want
    # And it reads back as the results, as the caller decodes it.
    envelope = wire.decode_as(bytearray(got), fmt)
    assert envelope["replicas"] == names
    assert envelope["errors"] == {}
    assert len(envelope["results"]) == replicas


def test_binary_replies_nest_arrays_whole() -> None:
    arrays = [np.arange(i + 1, dtype="float32") for i in range(3)]
    replies = [_reply(a, wire.FMT_BINARY) for a in arrays]
    got = _relay.broadcast_envelope(wire.BINARY, ["a", "b", "c"], replies)
    envelope = values.decode(bytearray(got))
    for want, result in zip(arrays, envelope["results"], strict=True):
        np.testing.assert_array_equal(result["result"], want)  # decoded with it


def _error_reply(err: KubeforgeError) -> bytes:
    return _response(wire.error_response(err))


@pytest.mark.parametrize(
    ("case", "replies", "ctype"),
    [
        ("one error", [_reply(1, "json"), _error_reply(UnknownEndpointError("x"))], wire.JSON),
        ("a reply in another format", [_reply(1, "msgpack")], wire.JSON),
        ("JSON for a binary caller", [_reply(1, "json")], wire.BINARY),
        ("another shape", [_response(Response(200, b'{"results":1}'))], wire.JSON),
        ("an empty body", [_response(Response(200, b""))], wire.JSON),
        ("a redirect", [_response(Response(302, b'{"result":1}'))], wire.JSON),
        ("msgpack, another shape", [_response(Response(200, b"\x80", wire.MSGPACK))], wire.MSGPACK),
    ],
)
def test_what_the_relay_does_not_splice_is_pythons(
    case: str, replies: list[bytes], ctype: bytes
) -> None:
    names = [f"r{i}" for i in range(len(replies))]
    assert _relay.broadcast_envelope(ctype, names, replies) is None, case
