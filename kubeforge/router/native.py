"""The native relay (`kubeforge._relay`, Rust, in relay/) as the router's call path.

The relay owns the router's public port and relays calls whose destination needs no decision;
it hands everything else to the router's Python server: a connection it does not serve (a body
that streams, a request it does not parse) as its socket, which that server adopts; a relayed
call that failed on a loopback port, marked with a per-process secret (which replica, and
how). So Python's routing table stays the one authority: this module pushes it to the relay
whenever it changes and pulls the relay's latency samples and in-flight counts into the same
windows and counters the Python call path feeds.

When the extension is not built (or KUBEFORGE_RELAY=python), the router relays calls in Python
with the same semantics, only slower.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kubeforge import metrics
from kubeforge.router import fanout
from kubeforge.router.core import ReplicaState
from kubeforge.router.discovery import split_url

if TYPE_CHECKING:
    from kubeforge.router.engine import Router
    from kubeforge.tokens import Tokens

try:
    from kubeforge import _relay  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _relay = None

log = logging.getLogger("kubeforge.router")


def wanted() -> bool:
    """Use the native relay: built, and not turned off with KUBEFORGE_RELAY=python."""
    choice = os.environ.get("KUBEFORGE_RELAY", "native")
    if choice not in ("native", "python"):
        raise ValueError(f"KUBEFORGE_RELAY must be 'native' or 'python', not {choice!r}")
    if choice == "python":
        return False
    if _relay is None:
        log.warning("the native relay is not built: calls are relayed in Python (slower)")
        return False
    return True


def _ipv4_first(host: str, port: int) -> str:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0])


class NativeRelay:
    def __init__(self, router: Router, host: str, port: int, backend_port: int, secret: str):
        cfg = router.config
        self.router = router
        self._addresses: dict[str, tuple[str, int]] = {}  # replica URL -> (IP, port), resolved once
        self._relay = _relay.Relay(
            _ipv4_first(host, port),
            port,
            backend_port,
            list(router.tokens.accept),
            router.tokens.send,
            secret,
            router.table.codec.key,
            cfg.request_timeout,
            cfg.health_timeout,  # to connect: a replica that cannot accept in this long is down
            cfg.max_body,
            metrics.SCALE,
            None if cfg.tls is None else (cfg.tls.ca, cfg.tls.name),
        )
        self.port: int = self._relay.port

    def push(self) -> None:
        """Give the relay the routing table as it is now."""
        rows = []
        for r in self.router.table.replicas.values():
            address = self._addresses.get(r.url)
            if address is None:
                host, port = split_url(r.url)
                address = self._addresses[r.url] = (_ipv4_first(host, port), port)
            healthy = r.state is ReplicaState.HEALTHY
            # The relay adds its own calls in flight to this load (everyone else's, and ours on
            # the Python path).
            load = r.external + r.in_flight
            rows.append((r.index, *address, healthy, r.instance or "", r.name, load))
        self._relay.set_replicas(rows)

    def collect(self) -> None:
        """Fold the relay's tallies and in-flight counts into the routing table's replicas."""
        tallies, in_flight = self._relay.drain()
        replicas = self.router.table.replicas
        # Calls tallied since the last drain (a tenth of a second) count as ended now.
        now = time.monotonic()
        for index, *tally in tallies:
            replica = replicas.get(index)
            if replica is not None:
                replica.record_tally(now, *tally)
        for index, count in in_flight:
            replica = replicas.get(index)
            if replica is not None:
                replica.relayed = count

    def take_broadcast(self, id_: int) -> list[fanout.Relayed] | None:
        """The outcomes of a broadcast the relay sent and passed on for Python to answer."""
        rows = self._relay.take_broadcast(id_)
        return None if rows is None else fanout.relayed(rows)

    def use(self, tokens: Tokens) -> None:
        self._relay.set_tokens(list(tokens.accept), tokens.send)

    def set_request_timeout(self, seconds: float) -> None:
        self._relay.set_request_timeout(seconds)

    def counts(self) -> dict[str, int]:
        relayed, handed_over = self._relay.counts()
        return {"relayed": relayed, "handed_over": handed_over}

    def hand_to(self, adopt: Callable[[socket.socket, bytes], None]) -> None:
        """Give each connection the relay hands over to `adopt`, with the bytes read from it."""
        self._adopt = adopt
        asyncio.get_running_loop().add_reader(self._relay.wake_fd, self._take_handed)

    def _take_handed(self) -> None:
        for fd, read in self._relay.take_handed():
            self._adopt(socket.socket(fileno=fd), read)

    async def close(self, grace: float) -> None:
        """Stop accepting; calls being answered get `grace` seconds (the Python server, which
        some of them wait on, keeps running meanwhile)."""
        asyncio.get_running_loop().remove_reader(self._relay.wake_fd)
        await asyncio.to_thread(self._relay.close, grace)
        self._take_handed()  # handed over while it stopped: answered, or closed by the server
