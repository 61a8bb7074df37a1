"""The wire protocol shared by router and replica (DESIGN §4): paths, headers, codecs.

Three body formats, chosen by the request's Content-Type; the reply follows the request's:
kubeforge's binary format (`kubeforge.values`, what Python callers send: arrays, tensors,
tuples and allowed classes keep their types), JSON (other languages, curl; arrays become nested
lists) and msgpack. Errors are always JSON. Pickle is never used.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack

from kubeforge import contract, values
from kubeforge.contract import (  # noqa: F401  (re-exported: the wire protocol's names)
    CALL_ALL_PREFIX,
    CALL_PREFIX,
    H_DELIVERY,
    H_RANKS,
    H_RETRYABLE,
    H_SESSION,
    H_SESSION_MOVED,
    H_SESSION_MOVED_FROM,
    H_TIMEOUT,
    SESSIONS_PATH,
    STREAM_PREFIX,
)
from kubeforge.errors import (
    BadRequestError,
    KubeforgeError,
    UnauthorizedError,
    UnknownEndpointError,
)
from kubeforge.http.server import Request, Response
from kubeforge.tokens import Tokens


def endpoint_of(path: str, prefix: str) -> str:
    """The endpoint named by a call path; only an ASCII Python identifier can name one.

    The router writes the endpoint into the request line it sends on, so a decoded path with
    spaces, CR/LF or bytes beyond ASCII must never get that far.
    """
    name = path[len(prefix) :]
    if not is_endpoint_name(name):
        raise UnknownEndpointError(f"{name!r} is not an endpoint name")
    return name


def is_endpoint_name(name: str) -> bool:
    return name.isascii() and name.isidentifier()


ALL_RANKS = b"all"  # the H_RANKS value: every rank's result, in rank order
AT_MOST_ONCE = b"at-most-once"  # the H_DELIVERY value that forbids re-sending a lost call
H_AUTH = b"authorization"
H_ACCEPT = b"accept"
H_CONTENT_TYPE = b"content-type"

JSON = contract.JSON_MEDIA
MSGPACK = contract.MSGPACK_MEDIA
BINARY = values.CONTENT_TYPE

# Body formats, by name.
FMT_JSON, FMT_MSGPACK, FMT_BINARY = "json", "msgpack", "binary"
_CONTENT_TYPES = {FMT_JSON: JSON, FMT_MSGPACK: MSGPACK, FMT_BINARY: BINARY}
FORMAT_NAMES = {FMT_JSON: "JSON", FMT_MSGPACK: "msgpack", FMT_BINARY: "kubeforge's binary format"}


def body_format(content_type: bytes | None) -> str:
    """The format a Content-Type names; JSON when it names none kubeforge knows."""
    if not content_type:
        return FMT_JSON
    media = content_type.split(b";")[0].strip().lower()
    if media in (MSGPACK, b"application/x-msgpack"):
        return FMT_MSGPACK
    if media == BINARY:
        return FMT_BINARY
    return FMT_JSON


def content_type(fmt: str) -> bytes:
    return _CONTENT_TYPES[fmt]


def is_msgpack(content_type: bytes | None) -> bool:
    return body_format(content_type) == FMT_MSGPACK


def encode(obj: Any, msgpack_format: bool = False) -> bytes:
    if msgpack_format:
        return msgpack.packb(obj, use_bin_type=True)
    return _JSON_ENCODER.encode(obj).encode()


def decode(body: bytes | bytearray | memoryview, msgpack_format: bool = False) -> Any:
    try:
        if msgpack_format:
            return msgpack.unpackb(body, raw=False)
        # JSON on the wire is UTF-8 (RFC 8259 §8.1): decoded here, not sniffed by json.loads.
        return _JSON_DECODER.decode(str(body, "utf-8"))
    except (ValueError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        fmt = "msgpack" if msgpack_format else "JSON"
        raise BadRequestError(f"malformed {fmt} body: {exc}") from None


def encode_as(obj: Any, fmt: str) -> bytes | values.Encoded:
    """`obj` in body format `fmt`; the binary format as parts to write, not one copy."""
    if fmt == FMT_BINARY:
        return values.encode(obj)
    return encode(obj, fmt == FMT_MSGPACK)


def decode_as(body: Any, fmt: str, allowed: values.Allowed | None = None) -> Any:
    """A body in format `fmt`; malformed or refused content is a BadRequestError (400)."""
    if fmt == FMT_BINARY:
        if isinstance(body, values.Encoded):  # made in this process (a local broadcast)
            body = bytearray(body.tobytes())
        try:
            return values.decode(body, allowed)
        except values.ValueFormatError as exc:
            raise BadRequestError(f"malformed {values.CONTENT_TYPE.decode()} body: {exc}") from None
    return decode(body, fmt == FMT_MSGPACK)


def _json_default(obj: Any) -> Any:
    """Values JSON lacks but users return all the time (tuples work already)."""
    if isinstance(obj, set | frozenset):
        return list(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors on CPU
        return obj.tolist()
    if hasattr(obj, "model_dump"):  # pydantic models
        return obj.model_dump()
    raise TypeError(f"result of type {type(obj).__name__} is not JSON serializable")


# Made once: `json.dumps` with options builds an encoder per call, which costs more than
# encoding a small answer.
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_json_default)
_JSON_DECODER = json.JSONDecoder()


def parse_call_body(
    body: Any, fmt: str = FMT_JSON, allowed: values.Allowed | None = None
) -> tuple[list[Any], dict[str, Any]]:
    """`{"args": [...], "kwargs": {...}}` with both keys optional; anything else is a 400.
    `allowed` are the classes a binary body may hold (the endpoint's type hints)."""
    if not body:
        return [], {}
    data = decode_as(body, fmt, allowed)
    if not isinstance(data, dict):
        raise BadRequestError('call body must be an object {"args": [...], "kwargs": {...}}')
    unknown = set(data) - {"args", "kwargs"}
    if unknown:
        raise BadRequestError(f"unknown keys in call body: {sorted(unknown)}")
    args = data.get("args", [])
    kwargs = data.get("kwargs", {})
    if not isinstance(args, list):
        raise BadRequestError('"args" must be a list')
    if not isinstance(kwargs, dict):
        raise BadRequestError('"kwargs" must be an object')
    return args, kwargs


def call_body(
    args: Any = (), kwargs: dict[str, Any] | None = None, fmt: str = FMT_JSON
) -> bytes | values.Encoded:
    return encode_as({"args": list(args), "kwargs": kwargs or {}}, fmt)


def error_body(err: KubeforgeError, msgpack_format: bool = False) -> bytes:
    return encode({"error": err.to_wire()}, msgpack_format)


def error_response(err: KubeforgeError, request_content_type: bytes | None = None) -> Response:
    """The HTTP answer for an error: msgpack for a msgpack request, else JSON (a binary-format
    caller reads JSON errors too; a broadcast can then name every replica's error)."""
    use_msgpack = is_msgpack(request_content_type)
    return Response(
        err.status,
        error_body(err, use_msgpack),
        MSGPACK if use_msgpack else JSON,
        [(H_RETRYABLE, type(err).__name__.encode())] if err.retryable else None,
    )


_HTTP_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "PayloadTooLargeError",
    431: "HeadTooLargeError",
}


def http_error(status: int, message: str) -> Response:
    """An error the HTTP layer itself raises (no route, unparsable request, body too large)."""
    kind = _HTTP_ERROR_TYPES.get(status, "HTTPError")
    return Response(status, encode({"error": {"type": kind, "message": message}}))


def check_token(req: Request, tokens: Tokens) -> None:
    """401 unless the request carries a token `tokens` accepts (constant-time compare)."""
    if not tokens.accept:
        return
    got = req.headers.get(H_AUTH)
    if got is None:
        raise UnauthorizedError("missing 'Authorization: Bearer <token>' header")
    if not tokens.allows(got):
        raise UnauthorizedError("wrong token")
