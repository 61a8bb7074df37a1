"""The router server: the HTTP edge around the router engine.

`/v1/call/...` is answered by the native relay (Rust, `router/native.py`) when it is built, or
else by `Router.relay`, a callback-only relay in Python, whenever they can; every other request
is translated here into one engine call. With the native relay this server listens on a
loopback port behind it.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time

from kubeforge import contract, openapi, prom, wire
from kubeforge.errors import KubeforgeError
from kubeforge.http.server import HttpServer, Request, Response
from kubeforge.router import native, report
from kubeforge.router.discovery import Discovery
from kubeforge.router.engine import PassOn, Router, RouterConfig

log = logging.getLogger("kubeforge.router")


class RouterServer:
    def __init__(self, config: RouterConfig, discovery: Discovery) -> None:
        self.config = config
        self.router = Router(config, discovery)
        self.native = native.wanted()
        # Bodies and replies beyond STREAM_BODY stream through, never held whole.
        config.stream_above = contract.STREAM_BODY
        self.http = HttpServer(
            self.handle,
            config.max_body,
            on_error=wire.http_error,
            fast=None if self.native else self.router.relay,
            stream_above=contract.STREAM_BODY,
        )
        self._secret = secrets.token_hex(16).encode()
        self._relay: native.NativeRelay | None = None
        self._openapi = wire.encode(openapi.document("kubeforge router", None, True))

    async def start(self) -> int:
        await self.router.start()
        if not self.native:
            self.config.port = await self.http.start(self.config.host, self.config.port)
            return self.config.port
        backend = await self.http.start("127.0.0.1", 0)
        self._relay = native.NativeRelay(
            self.router, self.config.host, self.config.port, backend, self._secret.decode()
        )
        self.router.attach(self._relay)
        self._relay.hand_to(self.http.adopt)
        self.config.port = self._relay.port
        return self.config.port

    def follow(self, settings: dict[str, float]) -> None:
        """Take changed settings from the Service resource while running: the Python call
        path reads them from `config` on every call, the native relay is told."""
        for key, value in settings.items():
            if getattr(self.config, key) != value:
                log.info("setting %s = %s from the Service resource", key, value)
                setattr(self.config, key, value)
        if self._relay is not None:
            self._relay.set_request_timeout(self.config.request_timeout)

    async def stop(self, grace: float = 5.0) -> None:
        if self._relay is not None:
            await self._relay.close(grace)
        await self.http.close(grace)
        await self.router.stop()

    def _from_relay(self, req: Request, header: bytes) -> str | None:
        """What the native relay says in `header`, when the request comes from it (its
        secret); callers' own `x-kubeforge-relay-*` headers never get here with it."""
        said = req.headers.get(header)
        secret = req.headers.get(contract.H_RELAY_SECRET)
        if said is None or secret is None or not hmac.compare_digest(secret, self._secret):
            return None
        return said.decode()

    def _relay_failure(self, req: Request) -> tuple[int, float, str] | None:
        """(replica index, seconds the attempt took, what happened) when the native relay
        passes on a call that failed there."""
        failed = self._from_relay(req, contract.H_RELAY_FAILED)
        if failed is None:
            return None
        index, took, report = failed.split(" ", 2)
        return int(index), float(took), report

    async def _broadcast(self, req: Request, endpoint: str) -> Response:
        """A broadcast: sent here, or sent by the native relay, which passes it on with its
        outcomes when it does not answer it itself."""
        parked = self._from_relay(req, contract.H_RELAY_BROADCAST)
        if parked is None or self._relay is None:
            return await self.router.broadcast(endpoint, req.body, req.headers)
        outcomes = self._relay.take_broadcast(int(parked))
        if outcomes is None:  # taken already, or dropped by a relay that stopped waiting
            return wire.http_error(503, "the broadcast's outcomes are gone")
        return self.router.relayed_broadcast(outcomes, req.headers)

    async def handle(self, req: Request) -> Response:
        path = req.path
        try:
            if path.startswith(wire.CALL_PREFIX) and req.method == "POST":
                # Here only when a relay (native or `Router.relay`) passed the call on: a bad
                # token, a session that must move, no pooled connection yet, or, from the native
                # relay, an attempt that failed (`resume` continues it).
                wire.check_token(req, self.router.tokens)
                wire.endpoint_of(path, wire.CALL_PREFIX)
                failed = self._relay_failure(req)
                if failed is None:
                    return await self.router.call(path, req.body, req.headers)
                try:
                    return await self.router.resume(path, req.body, req.headers, *failed)
                except PassOn:
                    return Response(503, b"", headers=[(contract.H_RELAY_PASS, b"1")])
            if path.startswith(wire.STREAM_PREFIX) and req.method == "POST":
                # Streams always take the engine's path (the relays pass them on): placed and
                # sent again like a call until the replica answers with its first item.
                wire.check_token(req, self.router.tokens)
                wire.endpoint_of(path, wire.STREAM_PREFIX)
                return await self.router.call(path, req.body, req.headers)
            if path.startswith("/v1/"):
                wire.check_token(req, self.router.tokens)
                return await self._control(req, path)
            if path == contract.HEALTHZ and req.method == "GET":
                healthy = len(self.router.table.healthy)
                return Response(200, wire.encode({"status": "ok", "healthy_replicas": healthy}))
            if path == contract.READYZ and req.method == "GET":
                return Response(
                    200 if self.router.polled_once else 503,
                    wire.encode({"ready": self.router.polled_once}),
                )
            if path == "/metrics" and req.method == "GET":
                return Response(200, self.prometheus(), prom.CONTENT_TYPE)
            if path == "/openapi.json" and req.method == "GET":
                return Response(200, self._openapi)
            return wire.http_error(404, f"no route for {req.method} {path}")
        except KubeforgeError as err:
            return wire.error_response(err, req.headers.get(wire.H_CONTENT_TYPE))

    async def _control(self, req: Request, path: str) -> Response:
        method = req.method
        self.router.collect()
        if path.startswith(wire.CALL_ALL_PREFIX) and method == "POST":
            return await self._broadcast(req, wire.endpoint_of(path, wire.CALL_ALL_PREFIX))
        if path == wire.SESSIONS_PATH and method == "POST":
            return await self.router.start_session()
        if path.startswith(wire.SESSIONS_PATH + "/") and method == "DELETE":
            return await self.router.end_session(path[len(wire.SESSIONS_PATH) + 1 :])
        if path == "/v1/metrics" and method == "GET":
            return Response(200, wire.encode(report.metrics(self.router, time.monotonic())))
        if path == "/v1/metrics/summary" and method == "GET":
            return Response(200, wire.encode(report.summary(self.router, time.monotonic())))
        if path == "/v1/replicas" and method == "GET":
            return Response(200, wire.encode(report.replicas(self.router, time.monotonic())))
        return wire.http_error(404, f"no route for {method} {path}")

    def prometheus(self) -> bytes:
        self.router.collect()
        return report.prometheus(self.router, time.monotonic())
