"""Bad input to router and replica: a clear 4xx with a message, never a 500, never a crash."""

import asyncio
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.integration.procs import Procs

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    procs = Procs(tmp_path_factory.mktemp("bad-input"), env={"KUBEFORGE_TOKEN": TOKEN})
    try:
        replica = procs.replica("examples.counter:Counter", "--max-body", "2048")
        router = procs.router([replica], "--max-body", "2048")
        yield {"replica": replica.url, "router": router.url}
    finally:
        procs.cleanup()


@pytest.fixture(params=["replica", "router"])
def base(request: pytest.FixtureRequest, deployment: dict[str, str]) -> str:
    return deployment[request.param]


async def _post(
    base: str,
    path: str,
    data: bytes,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict]:
    merged = {"Content-Type": "application/json", **AUTH, **(headers or {})}
    merged = {k: v for k, v in merged.items() if v}  # "" means: leave the header out
    async with (
        aiohttp.ClientSession() as http,
        http.post(base + path, data=data, headers=merged) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


CASES = [
    ("unknown endpoint", "/v1/call/nope", b"{}", {}, 404, "no endpoint 'nope'"),
    ("malformed JSON", "/v1/call/incr", b'{"args": [1', {}, 400, "malformed JSON"),
    ("body not an object", "/v1/call/incr", b"[1, 2]", {}, 400, "must be an object"),
    ("args not a list", "/v1/call/incr", b'{"args": 5}', {}, 400, '"args" must be a list'),
    ("wrong arguments", "/v1/call/incr", b'{"args": [1, 2, 3]}', {}, 422, "TypeError"),
    (
        "unexpected kwarg",
        "/v1/call/incr",
        b'{"kwargs": {"nope": 1}}',
        {},
        422,
        "unexpected keyword argument 'nope'",
    ),
    (
        "body over the limit",
        "/v1/call/incr",
        b'{"args": ["' + b"x" * 10_000 + b'"]}',
        {},
        413,
        "exceeds",
    ),
    (
        "unknown session",
        "/v1/call/incr",
        b"{}",
        {"X-Kubeforge-Session": "0.abcdef.000000000000.0000000000000000"},
        404,
        "session",
    ),
    ("missing token", "/v1/call/incr", b"{}", {"Authorization": ""}, 401, "Authorization"),
    ("wrong token", "/v1/call/incr", b"{}", {"Authorization": "Bearer nope"}, 401, "wrong token"),
    (
        "bad timeout header",
        "/v1/call/incr",
        b"{}",
        {"X-Kubeforge-Timeout": "soon"},
        422,
        "x-kubeforge-timeout header 'soon'",
    ),
]


@pytest.mark.parametrize(
    ("case", "path", "data", "headers", "status", "text"), CASES, ids=[c[0] for c in CASES]
)
async def test_bad_input_gets_a_clear_4xx(
    base: str, case: str, path: str, data: bytes, headers: dict[str, str], status: int, text: str
) -> None:
    got, body = await _post(base, path, data, headers)
    assert got == status, body
    assert text in body["error"]["message"], body


async def test_unparsable_http_gets_400_and_the_server_lives(base: str) -> None:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"THIS IS NOT HTTP\r\n\r\n")
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert line.startswith(b"HTTP/1.1 400")
    status, _ = await _post(base, "/v1/call/incr", b'{"args": [1]}')
    assert status == 200


async def _raw(base: str, data: bytes, reply_timeout: float = 5.0) -> bytes:
    """Send raw bytes; the first line of the answer (b"" when the server just closes)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), reply_timeout)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_a_head_ended_by_a_bare_newline_gets_an_answer(base: str) -> None:
    line = await _raw(base, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\n")
    assert line.startswith((b"HTTP/1.1 200", b"HTTP/1.1 400")), line  # answered, not hung


async def test_an_endless_head_gets_431(base: str) -> None:
    head = b"GET /healthz HTTP/1.1\r\nX-Long: " + b"a" * (200 * 1024)
    line = await _raw(base, head)
    assert line.startswith(b"HTTP/1.1 431"), line
    status, _ = await _post(base, "/v1/call/incr", b'{"args": [1]}')
    assert status == 200


async def test_a_path_cannot_smuggle_header_lines(base: str) -> None:
    for path in ("/v1/call/incr%0d%0aX-Evil:%201", "/v1/call_all/incr%0d%0aX-Evil:%201"):
        status, body = await _post(base, path, b"{}")
        assert status == 404, body  # (replicas have no call_all route at all)
        assert body["error"]["type"] in ("UnknownEndpointError", "NotFound"), body


async def test_chunked_body_and_expect_continue_work(base: str) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"args": '
        yield b"[5]}"

    async with (
        aiohttp.ClientSession() as http,
        http.post(
            base + "/v1/call/value",
            data=chunks(),
            headers={"Content-Type": "application/json", **AUTH},
            expect100=True,
        ) as resp,
    ):
        assert resp.status == 422  # value() takes no argument: the body did arrive whole
        assert "TypeError" in (await resp.json())["error"]["message"]


async def test_openapi_and_prometheus_are_served(base: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/openapi.json") as resp:
            doc = await resp.json()
            assert doc["openapi"].startswith("3.") and "/v1/call/{endpoint}" in doc["paths"]
        async with http.get(base + "/metrics") as resp:
            text = await resp.text()
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert "# TYPE kubeforge_" in text
