"""Session ids that carry their own assignment, so any router can route them with no store.

An issued session id is `<replica index>.<replica instance>.<nonce>.<mac>`. The index says
which replica holds the session; the instance (a random id each replica process picks at
start) says which incarnation of it, so a restarted replica, whose session state is gone, is
seen as lost. The MAC, keyed by the shared token, lets every router reject a mistyped or
forged id as "unknown" instead of routing it somewhere arbitrary.

Any other string is a session the caller named (torchforge's `sess_id="episode-17"`). It
carries no assignment: the replica that holds it is the authority, and a router that does not
know where it lives asks the replicas before it places it (`Router._place_named`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from kubeforge.errors import BadRequestError, UnknownSessionError

_FORM = re.compile(r"^(\d{1,6})\.([0-9A-Za-z-]{1,64})\.([0-9a-f]{12})\.([0-9a-f]{16})$")


MAX_NAME = 256  # characters of a caller-named session


def check_name(name: str) -> None:
    """A caller's session name travels in a header and a path: printable ASCII, no edge spaces."""
    if not 0 < len(name) <= MAX_NAME or not name.isascii() or not name.isprintable():
        raise BadRequestError(
            f"session id {name!r}: 1-{MAX_NAME} printable ASCII characters expected"
        )
    if name != name.strip():
        raise BadRequestError(f"session id {name!r}: no leading or trailing spaces")


@dataclass(frozen=True, slots=True)
class SessionRef:
    index: int
    instance: str


class SessionCodec:
    def __init__(self, key: str | None) -> None:
        self._key = (key or "kubeforge-session").encode()

    @property
    def key(self) -> str:
        """The MAC key, for the native relay, which checks session ids itself."""
        return self._key.decode()

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()[:16]

    def new(self, index: int, instance: str) -> str:
        body = f"{index}.{instance}.{secrets.token_hex(6)}"
        return f"{body}.{self._mac(body)}"

    def issued_form(self, session_id: str) -> bool:
        """It looks like an id a router issued (then its MAC decides); else the caller named it."""
        return _FORM.fullmatch(session_id) is not None

    def parse(self, session_id: str) -> SessionRef:
        m = _FORM.fullmatch(session_id)
        if m is None or not hmac.compare_digest(
            m.group(4), self._mac(session_id.rsplit(".", 1)[0])
        ):
            raise UnknownSessionError(
                f"unknown session {session_id!r}: not a session id issued by this service",
                session_id=session_id,
            )
        return SessionRef(int(m.group(1)), m.group(2))
