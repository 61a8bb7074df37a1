"""The shared names of kubeforge (kubeforge/contract.toml), as Python constants.

The TOML file is the one definition: the Rust relay compiles the same file in (relay/build.rs),
so a header or path renamed there is renamed for every part at once.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

_DATA = tomllib.loads((Path(__file__).with_name("contract.toml")).read_text())

GROUP: str = _DATA["api"]["group"]
VERSION: str = _DATA["api"]["version"]
API_VERSION = f"{GROUP}/{VERSION}"
KIND: str = _DATA["api"]["kind"]
PLURAL: str = _DATA["api"]["plural"]
SHORT_NAME: str = _DATA["api"]["short_name"]
CATEGORY: str = _DATA["api"]["category"]
CRD_NAME = f"{PLURAL}.{GROUP}"
LABEL_PREFIX = f"{GROUP}/"


def _label(key: str) -> str:
    return LABEL_PREFIX + _DATA["labels"][key]


L_SERVICE = _label("service")
L_COMPONENT = _label("component")
L_INDEX = _label("replica_index")
L_HOST = _label("host_index")
L_HASH = _label("template_hash")
A_ROUTER_HASH = _label("router_hash")


def _header(key: str) -> bytes:
    return _DATA["headers"][key].encode()


H_SESSION = _header("session")
H_SESSION_MOVED = _header("session_moved")  # request: "error" to get SessionMovedError
H_SESSION_MOVED_FROM = _header("session_moved_from")  # response: the id a session had before
H_TIMEOUT = _header("timeout")  # request: seconds the caller is willing to wait
H_DELIVERY = _header("delivery")  # request: "at-most-once" forbids re-sending a lost call
H_RANKS = _header("ranks")  # request: "all" for every rank's result of an SPMD replica
# response: the call never reached the actor (overloaded, draining); the router may go elsewhere
H_RETRYABLE = _header("retryable")
H_RELAY_PREFIX = _header("relay_prefix")  # headers only the native relay may send
H_RELAY_SECRET = _header("relay_secret")
H_RELAY_FAILED = _header("relay_failed")
H_RELAY_PASS = _header("relay_pass")
H_RELAY_BROADCAST = _header("relay_broadcast")  # the body is a broadcast's outcomes
H_SHM = _header("shm")  # the sender's pid: it lends and borrows bodies in shared memory
H_SHM_BODY = _header("shm_body")  # the body lies in the sender's segment: "pid fd seq length"
H_SHM_FREE = _header("shm_free")  # the receiver's segments the sender views no more: "seq,seq"
H_SHM_DROP = _header("shm_drop")  # the sender's segments it let go, to unmap: "seq,seq"

CALL_PREFIX: str = _DATA["paths"]["call"]
STREAM_PREFIX: str = _DATA["paths"]["stream"]
CALL_ALL_PREFIX: str = _DATA["paths"]["call_all"]
SESSIONS_PATH: str = _DATA["paths"]["sessions"]
HEALTHZ: str = _DATA["paths"]["healthz"]
READYZ: str = _DATA["paths"]["readyz"]

STREAM_BODY: int = _DATA["limits"]["stream_body"]
STREAM_MEDIA: bytes = _DATA["media"]["stream"].encode()
JSON_MEDIA: bytes = _DATA["media"]["json"].encode()
MSGPACK_MEDIA: bytes = _DATA["media"]["msgpack"].encode()
BINARY_MEDIA: bytes = _DATA["media"]["binary"].encode()

# kubeforge's binary format: the parts the relay writes too (a broadcast's nested replies).
BINARY_MAGIC: bytes = _DATA["binary"]["magic"].encode()
BINARY_VERSION: int = _DATA["binary"]["version"]
BINARY_ALIGN: int = _DATA["binary"]["align"]
EXT_MESSAGE: int = _DATA["binary"]["ext_message"]
