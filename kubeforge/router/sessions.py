"""Session ids that carry their own assignment, so any router can route them with no store.

A session id is `<replica index>.<replica instance>.<nonce>.<mac>`. The index says which replica
holds the session; the instance (a random id each replica process picks at start) says which
incarnation of it, so a restarted replica, whose session state is gone, is seen as lost. The
MAC, keyed by the shared token, lets every router reject a mistyped or forged id as "unknown"
instead of routing it somewhere arbitrary.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from kubeforge.errors import UnknownSessionError

_FORM = re.compile(r"^(\d{1,6})\.([0-9A-Za-z-]{1,64})\.([0-9a-f]{12})\.([0-9a-f]{16})$")


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
