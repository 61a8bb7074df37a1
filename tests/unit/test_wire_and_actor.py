import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from kubeforge import Actor, endpoint, wire
from kubeforge._runtime import duration
from kubeforge.actor import endpoints_of, load_actor_class
from kubeforge.errors import (
    BadRequestError,
    OverloadedError,
    RemoteError,
    RequestTimeoutError,
    SessionMovedError,
    from_wire,
)
from kubeforge.replica.admission import Admission


class Sample(Actor):
    @endpoint
    async def a(self, x: int, y: int = 2) -> int:
        return x + y

    @endpoint
    def b(self) -> None: ...

    def helper(self) -> None: ...


def test_endpoint_discovery_with_signatures() -> None:
    eps = endpoints_of(Sample)
    assert set(eps) == {"a", "b"}
    assert eps["a"].is_async and not eps["b"].is_async
    assert str(eps["a"].signature) == "(x: int, y: int = 2) -> int"


def test_load_actor_class_errors_are_specific() -> None:
    with pytest.raises(ValueError, match="must look like"):
        load_actor_class("examples.counter")
    with pytest.raises(ValueError, match="cannot import actor module"):
        load_actor_class("no_such_module_xyz:Thing")
    with pytest.raises(ValueError, match="has no attribute"):
        load_actor_class("examples.counter:Nope")
    assert load_actor_class("examples.counter:Counter").__name__ == "Counter"


SCRIPT = """
from __future__ import annotations
from dataclasses import dataclass
import multiprocessing  # torch imports it: its first import re-points __mp_main__
from kubeforge import Actor, endpoint

@dataclass
class Inner:
    n: int

@dataclass
class Outer:
    inner: Inner

class Keeper(Actor):
    @endpoint
    async def keep(self, outer: Outer) -> None: ...
"""


def test_a_script_actor_that_imports_multiprocessing_keeps_its_classes_allowed(
    tmp_path: Path,
) -> None:
    """A replica loads the user's script as `__mp_main__`; the classes its hints name, through
    a dataclass's fields, resolve there even when the script imports multiprocessing."""
    script = tmp_path / "script_actor.py"
    script.write_text(SCRIPT)
    probe = (
        "from kubeforge.actor import load_actor_class; from kubeforge import values; "
        f"cls = load_actor_class({str(script) + ':Keeper'!r}); "
        "print(sorted(values.Allowed.from_hints(cls.keep).classes))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['__main__:Inner', '__main__:Outer']"


@pytest.mark.parametrize(
    "body", [b"{bad", b"[1]", b'{"args": 1}', b'{"kwargs": []}', b'{"argz": []}']
)
def test_malformed_call_bodies_are_bad_requests(body: bytes) -> None:
    with pytest.raises(BadRequestError):
        wire.parse_call_body(body)


def test_call_body_round_trip_in_every_format() -> None:
    for fmt in (wire.FMT_JSON, wire.FMT_MSGPACK, wire.FMT_BINARY):
        raw = wire.call_body([1, "x"], {"k": [1.5]}, fmt)
        raw = raw if isinstance(raw, bytes) else raw.tobytes()
        assert wire.parse_call_body(raw, fmt) == ([1, "x"], {"k": [1.5]})
    assert wire.parse_call_body(b"") == ([], {})


def test_errors_survive_the_wire() -> None:
    err = from_wire(SessionMovedError("moved", session_id="s2").to_wire())
    assert isinstance(err, SessionMovedError) and err.details["session_id"] == "s2"
    remote = from_wire({"type": "ValueError", "message": "boom", "origin": "endpoint"})
    assert isinstance(remote, RemoteError) and remote.remote_type == "ValueError"
    # An endpoint raising an exception named like ours is still the endpoint's.
    same_name = from_wire({"type": "OverloadedError", "message": "x", "origin": "endpoint"})
    assert isinstance(same_name, RemoteError)


@pytest.mark.parametrize(
    ("text", "seconds"), [("200ms", 0.2), ("1.5s", 1.5), ("2m", 120.0), ("3", 3.0), (0.25, 0.25)]
)
def test_durations(text: str, seconds: float) -> None:
    assert duration(text) == pytest.approx(seconds)


def test_bad_duration() -> None:
    with pytest.raises(ValueError, match="bad duration"):
        duration("fast")


async def test_admission_queues_then_rejects_then_hands_slots_in_order() -> None:
    adm = Admission(max_active=2, max_queued=2)
    await adm.acquire(1.0)
    await adm.acquire(1.0)
    order: list[int] = []

    async def waiter(i: int) -> None:
        await adm.acquire(1.0)
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(2)]
    await asyncio.sleep(0.01)
    assert adm.queued == 2
    with pytest.raises(OverloadedError, match="at capacity"):
        await adm.acquire(1.0)
    adm.release()
    adm.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1] and adm.active == 2


async def test_admission_queue_timeout_frees_its_place() -> None:
    adm = Admission(max_active=1, max_queued=1)
    await adm.acquire(1.0)
    with pytest.raises(RequestTimeoutError, match="waiting in the replica's queue"):
        await adm.acquire(0.05)
    assert adm.queued == 0
    adm.release()
    assert adm.active == 0


def test_retryable_errors_are_503_as_the_relay_assumes() -> None:
    import kubeforge.errors as errors

    kinds = [
        c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.KubeforgeError)
    ]
    assert {c.__name__ for c in kinds if c.retryable} == {"OverloadedError", "DrainingError"}
    assert all(c.status == 503 for c in kinds if c.retryable)


def test_client_response_headers_are_parsed_from_raw_on_demand() -> None:
    from kubeforge.http.client import ClientResponse

    raw = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"X-Kubeforge-Retryable: OverloadedError\r\ncontent-length: 2\r\n\r\n{}"
    )
    resp = ClientResponse(503, b"{}", raw)
    assert resp.headers[b"x-kubeforge-retryable"] == b"OverloadedError"
    assert resp.headers[b"content-type"] == b"application/json"
