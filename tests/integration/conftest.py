from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.procs import Procs


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


async def call(
    http: aiohttp.ClientSession,
    base: str,
    endpoint: str,
    *args: Any,
    session: str | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, Any, Any]:
    """POST /v1/call/{endpoint}; returns (status, decoded body, response headers)."""
    h = dict(headers or {})
    if session:
        h["X-Kubeforge-Session"] = session
    async with http.post(
        f"{base}/v1/call/{endpoint}", json={"args": list(args), "kwargs": kwargs}, headers=h
    ) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


async def start_session(http: aiohttp.ClientSession, base: str) -> str:
    async with http.post(f"{base}/v1/sessions") as resp:
        assert resp.status == 201, await resp.text()
        return (await resp.json())["session_id"]
