"""The shared token: which one a part sends, which ones it accepts, and how it is rotated.

On Kubernetes the token lives in the Service's `<name>-token` Secret, mounted into every router
and replica pod as files (`KUBEFORGE_TOKEN_DIR`); the kubelet rewrites them when the Secret
changes and each process reloads them (`follow`). Elsewhere it is `$KUBEFORGE_TOKEN`, fixed.

A rotation must fail no call while the pods pick up the Secret at different moments, so it
goes in three states, each written only once every pod has loaded the one before
(`kubeforge rotate-token` waits on the digests the pods report in the Service's status):

1. staged:   send the old token; accept old and new;
2. promoted: send the new token; accept new and old (callers move to the new one meanwhile);
3. done:     send and accept the new token only.

A sender of state n is always understood by a receiver of state n-1, n or n+1, which is all
that can coexist once each state waits for the one before. The session key (the MAC of issued
session ids) never rotates, so sessions survive.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

log = logging.getLogger("kubeforge.tokens")

# Keys of the token Secret (and so the file names in KUBEFORGE_TOKEN_DIR).
KEY_TOKEN = "token"  # sent, and accepted
KEY_ACCEPT = "accept"  # accepted too during a rotation, one per line
KEY_SESSION = "session-key"  # the MAC key of issued session ids; never rotated
KEY_ROTATION = "rotation"  # "staged" or "promoted" while a rotation is under way
KEYS = (KEY_TOKEN, KEY_ACCEPT, KEY_SESSION, KEY_ROTATION)
ENV_TOKEN = "KUBEFORGE_TOKEN"
ENV_DIR = "KUBEFORGE_TOKEN_DIR"
MOUNT_PATH = "/var/run/kubeforge/token"  # where pods find the Secret's files
STAGED, PROMOTED = "staged", "promoted"
_NO_SESSION_KEY = "kubeforge-session"


@dataclass(frozen=True)
class Tokens:
    """What one process sends and accepts now. No token at all means no check."""

    send: str | None = None
    accept: tuple[str, ...] = ()  # `send` first, then any accepted during a rotation
    session_key: str = _NO_SESSION_KEY

    @cached_property
    def header(self) -> bytes | None:
        """The exact `Authorization` value this process sends."""
        return f"Bearer {self.send}".encode() if self.send else None

    @cached_property
    def line(self) -> bytes:
        """The header line a router adds to what it forwards ("" without a token)."""
        return b"authorization: " + self.header + b"\r\n" if self.header else b""

    @cached_property
    def headers(self) -> tuple[bytes, ...]:
        """Every `Authorization` value accepted."""
        return tuple(f"Bearer {t}".encode() for t in self.accept)

    @cached_property
    def digest(self) -> str:
        """Short fingerprint of the whole set: what pods report so a rotation knows who
        loaded what, without the tokens themselves leaving the pods."""
        text = "\0".join([self.send or "", *sorted(self.accept), self.session_key])
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def allows(self, header: bytes | None) -> bool:
        if not self.accept:
            return True
        if header is None:
            return False
        ok = False
        for want in self.headers:  # constant time per candidate, and every candidate tried
            ok |= hmac.compare_digest(header, want)
        return ok

    def accepts_token(self, token: str | None) -> bool:
        return self.allows(f"Bearer {token}".encode() if token else None)


def static(token: str | None) -> Tokens:
    """One token that never changes (`$KUBEFORGE_TOKEN`, a local Service)."""
    if not token:
        return Tokens()
    return Tokens(token, (token,), token)


def _accepted(data: Mapping[str, str]) -> list[str]:
    """The extra accepted tokens of the Secret's data, one per line."""
    return [t.strip() for t in (data.get(KEY_ACCEPT) or "").splitlines() if t.strip()]


def from_secret(data: Mapping[str, str]) -> Tokens:
    """The token Secret's (decoded) data as a process uses it."""
    send = (data.get(KEY_TOKEN) or "").strip() or None
    extra = _accepted(data)
    accept = tuple(dict.fromkeys([*([send] if send else []), *extra]))
    session_key = (data.get(KEY_SESSION) or "").strip() or send or _NO_SESSION_KEY
    return Tokens(send, accept, session_key)


class RotationError(ValueError):
    pass


def rotation(data: Mapping[str, str], new: str) -> list[dict[str, str]]:
    """The Secret data to write, in order, to move from `data` to `new`; a rotation that was
    cut off part-way is carried on to the token it had staged (then `new` is not used)."""
    old = (data.get(KEY_TOKEN) or "").strip()
    if not old:
        raise RotationError("the Secret has no token to rotate")
    key = (data.get(KEY_SESSION) or "").strip() or old
    state = data.get(KEY_ROTATION, "")
    accept = _accepted(data)
    if state and len(accept) != 1:
        raise RotationError(f"rotation {state!r} with {len(accept)} accepted tokens: expected 1")

    def step(send: str, also: str | None, mark: str | None) -> dict[str, str]:
        out = {KEY_TOKEN: send, KEY_SESSION: key}
        if also:
            out[KEY_ACCEPT] = also
        if mark:
            out[KEY_ROTATION] = mark
        return out

    if state == PROMOTED:
        return [step(old, None, None)]
    if state == STAGED:
        new = accept[0]
    elif state:
        raise RotationError(f"unknown rotation state {state!r}")
    elif not new or new == old or any(c.isspace() for c in new):
        raise RotationError("the new token must differ from the old one and hold no spaces")
    staged = [step(old, new, STAGED)] if state != STAGED else []
    return [*staged, step(new, old, PROMOTED), step(new, None, None)]


# -- the shell: files and the environment ----------------------------------------------------


def mounted_version(path: Path) -> Path:
    """Where a mounted Secret's current version is: the kubelet swaps `..data` in one
    rename, so files read through it come from one version even while it is updating them
    (a plain directory, as tests and local runs give, is its own version)."""
    data_dir = path / "..data"
    return data_dir.resolve() if data_dir.exists() else path


def read_dir(path: Path) -> Tokens:
    """The Secret as the kubelet projects it, from one version of it."""
    base = mounted_version(path)
    data = {}
    for key in KEYS:
        with contextlib.suppress(FileNotFoundError):
            data[key] = (base / key).read_text()
    return from_secret(data)


def from_environ(environ: Mapping[str, str] = os.environ) -> tuple[Tokens, Path | None]:
    """The tokens to start with, and the directory to follow (None: they never change)."""
    directory = environ.get(ENV_DIR)
    if directory:
        return read_dir(Path(directory)), Path(directory)
    return static(environ.get(ENV_TOKEN) or None), None


async def follow(
    path: Path, current: Tokens, use: Callable[[Tokens], None], interval: float = 1.0
) -> None:
    """Hand `use` every new version of the files (checked each `interval`), until cancelled."""
    while True:
        await asyncio.sleep(interval)
        try:
            loaded = read_dir(path)
        except OSError as exc:  # mid-update or briefly gone: keep what works
            log.warning("token files unreadable, keeping the loaded ones: %s", exc)
            continue
        if loaded != current:
            log.info("tokens reloaded: %s -> %s", current.digest, loaded.digest)
            current = loaded
            use(loaded)
