"""`ServiceClient`: the torchforge `Service` API against a router URL.

The same calls as the local `Service`, over HTTP to `kubeforge run` or an in-cluster router;
`get_metrics()` and `get_metrics_summary()` are async here because they cross the network.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp

from kubeforge import lifecycle, streams, values, wire
from kubeforge.errors import NoHealthyReplicasError
from kubeforge.http.server import ONE_BUFFER, BodyBuffer
from kubeforge.http.stream import slices
from kubeforge.router.retry import Outcome, decide
from kubeforge.service_api import (
    Reply,
    ServiceAPI,
    ServiceMetrics,
    decode_reply,
    summary_with_int_keys,
)


def _outcome(exc: aiohttp.ClientError) -> Outcome:
    """What a broken request to a router means for the call: never sent, or it may have run."""
    return Outcome.CONNECT if isinstance(exc, aiohttp.ClientConnectorError) else Outcome.LOST


async def _parts(body: values.Encoded) -> AsyncIterator[Any]:
    """A message's parts as aiohttp writes them: in order, never joined, a large part in
    slices (asyncio before 3.12 takes time quadratic in the size of one big write)."""
    for chunk in slices(body.parts):
        yield chunk


async def _read(response: aiohttp.ClientResponse) -> bytes | bytearray:
    """The body; a large one into one writable buffer, which decoded arrays then view."""
    length = response.content_length
    if length is None or length <= ONE_BUFFER:
        return await response.read()
    buf = BodyBuffer(length)
    async for chunk in response.content.iter_any():
        if not buf.add(chunk):
            raise aiohttp.ClientPayloadError("response body is longer than its content-length")
    if buf.filled != length:
        raise aiohttp.ClientPayloadError(f"response body ended at {buf.filled} of {length} bytes")
    return buf.buf


async def _chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """A streamed reply's chunks until it ends, or until it is cut (which the reader tells
    from its missing end frame)."""
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        return


def _closer(response: aiohttp.ClientResponse) -> Callable[[], Awaitable[None]]:
    """How a streamed reply is let go: its connection back to the pool when the stream was
    read to its end, else closed, which cancels the generator on the replica."""

    async def close() -> None:
        if response.content.at_eof():
            response.release()
        else:
            response.close()

    return close


class ServiceClient(ServiceAPI):
    def __init__(
        self,
        url: str | Sequence[str],
        token: str | None = None,
        timeout: float = 300.0,
        raise_on_session_moved: bool = False,
        connections: int = 100,
        at_most_once: bool = False,
        return_first_rank_result: bool = True,
        actor: type | None = None,
        body_format: str = wire.FMT_BINARY,
    ) -> None:
        """`url` is the router's, or several routers' of one Service (pods of a router
        Deployment): a request that cannot reach one goes to the next, as the retry rule allows
        (`kubeforge.router.retry.decide`: a call cut short in a session is not sent again).
        Sessions live in their ids, so any router carries them to their replica.
        `token` defaults to $KUBEFORGE_TOKEN; `timeout` bounds every request.

        `at_most_once` stops the router from re-sending a call without a session that was cut
        short by its replica's death (by default such a call runs again on another replica).
        `return_first_rank_result=False` returns every rank's result of replicas with several
        ranks (procs/hosts), in rank order, as torchforge's ServiceConfig option does.

        `actor` is the actor class the Service runs, when the caller has it: the dataclasses,
        pydantic models, enums and NamedTuples its endpoints name in their type hints come back
        as those classes (others need `kubeforge.register_type`). `body_format` is "binary"
        (kubeforge's format: arrays and tensors keep dtype and shape), "json" or "msgpack".
        """
        super().__init__(actor)
        if body_format not in (wire.FMT_BINARY, wire.FMT_JSON, wire.FMT_MSGPACK):
            raise ValueError(f"body_format must be binary, json or msgpack, not {body_format!r}")
        self.body_format = body_format
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("ServiceClient needs at least one router URL")
        self.urls = [u.rstrip("/") for u in urls]
        token = token if token is not None else os.environ.get("KUBEFORGE_TOKEN")
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._connections = connections
        self.raise_on_session_moved = raise_on_session_moved
        self.at_most_once = at_most_once
        self.return_first_rank_result = return_first_rank_result
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ServiceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def stop(self) -> None:
        """torchforge's `stop()`: here it only closes the client; the service keeps running."""
        lifecycle.stopped(self)  # if connect() registered it for kubeforge.shutdown()
        await self.close()

    def stop_at_exit(self) -> None:
        """Nothing to stop at interpreter exit: the connections close with the process."""
        self._http = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self._connections),
                headers=self._auth,
            )
        return self._http

    @property
    def url(self) -> str:
        """The router that requests go to first (routers that failed move to the back)."""
        return self.urls[0]

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = b"",
        headers: dict[bytes, bytes] | None = None,
        stream: bool = False,
    ) -> Reply:
        headers = headers or {}
        h = {k.decode(): v.decode() for k, v in headers.items()}
        if isinstance(body, values.Encoded):
            h["Content-Length"] = str(body.nbytes)
        tried: list[str] = []
        while True:
            url = next(u for u in self.urls if u not in tried)
            data = _parts(body) if isinstance(body, values.Encoded) else body
            try:
                r = await self._session().request(method, url + path, data=data, headers=h)
                out = {k.lower().encode(): v.encode() for k, v in r.headers.items()}
                if stream and r.status < 300 and streams.item_type(out.get(wire.H_CONTENT_TYPE)):
                    return Reply(r.status, _chunks(r), out, _closer(r))
                try:
                    reply = Reply(r.status, await _read(r), out)
                finally:
                    r.release()
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                tried.append(url)
                # A router that failed goes last, so that the next request (and its pooled
                # connections, stale if the router died) goes elsewhere first.
                self.urls.remove(url)
                self.urls.append(url)
                decision = decide(
                    _outcome(exc),
                    len(tried) - 1,
                    len(self.urls) - 1,
                    at_most_once=headers.get(wire.H_DELIVERY) == wire.AT_MOST_ONCE,
                    in_session=wire.H_SESSION in headers,
                    others=len(self.urls) - len(tried),
                )
                if not decision.resend:
                    where = f"the router at {url}" if len(tried) == 1 else ", ".join(tried)
                    raise NoHealthyReplicasError(f"cannot reach {where}: {exc}") from None
                continue
            return reply

    async def _send_call(self, endpoint: str, body: bytes, headers: dict[bytes, bytes]) -> Reply:
        return await self._request("POST", wire.CALL_PREFIX + endpoint, body, headers)

    async def _send_stream(self, path: str, body: bytes, headers: dict[bytes, bytes]) -> Reply:
        return await self._request("POST", path, body, headers, True)

    async def _send_broadcast(
        self, endpoint: str, body: bytes, headers: dict[bytes, bytes]
    ) -> Reply:
        return await self._request("POST", wire.CALL_ALL_PREFIX + endpoint, body, headers)

    async def _send_start_session(self) -> Reply:
        return await self._request("POST", wire.SESSIONS_PATH)

    async def _send_end_session(self, session_id: str) -> Reply:
        return await self._request("DELETE", f"{wire.SESSIONS_PATH}/{session_id}")

    async def get_metrics_summary(self) -> dict[str, Any]:
        reply = await self._request("GET", "/v1/metrics/summary")
        return summary_with_int_keys(wire.decode(reply.body))

    async def get_metrics(self) -> ServiceMetrics:
        return ServiceMetrics.from_summary(await self.get_metrics_summary())

    async def replicas(self) -> list[dict[str, Any]]:
        """Per-replica state and figures, as `kubeforge status` shows them; a refusal (a wrong
        token, say) raises its typed error."""
        return decode_reply(await self._request("GET", "/v1/replicas"))
