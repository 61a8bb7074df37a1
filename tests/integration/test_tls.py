"""TLS between router and replicas: calls cross it, replicas speak nothing else, and a router
that trusts another Service's CA, or checks another name, reaches no replica."""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from kubeforge import ServiceClient, tls
from kubeforge.errors import NoHealthyReplicasError
from kubeforge.local import free_port
from tests.integration.procs import Procs, http_get
from tests.steady_calls import SteadyCalls

TOKEN = "tls-token"
NAME = tls.server_name("svc", "ns")


def _write(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True)
    for key, data in files.items():
        (directory / key).write_bytes(data)
    return directory


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What replicas mount (certificate, key, CA), what routers mount (the CA alone), and the
    CA of another Service."""
    root = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    issued = tls.issue("svc", "ns", now)
    other = tls.issue("other", "ns", now)
    return {
        "replica": _write(root / "replica", issued),
        "router": _write(root / "router", {tls.KEY_CA: issued[tls.KEY_CA]}),
        "stranger": _write(root / "stranger", {tls.KEY_CA: other[tls.KEY_CA]}),
    }


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Procs]:
    procs = Procs(tmp_path_factory.mktemp("tls"), env={"KUBEFORGE_TOKEN": TOKEN})
    try:
        yield procs
    finally:
        procs.cleanup()


async def _states(url: str, want: str, timeout: float = 20.0) -> list[str]:
    async with ServiceClient(url, token=TOKEN) as client:
        deadline = time.monotonic() + timeout
        while True:
            states = [r["state"] for r in await client.replicas()]
            if all(s == want for s in states) or time.monotonic() > deadline:
                return states
            await asyncio.sleep(0.1)


async def test_calls_cross_tls_and_replicas_speak_nothing_else(
    procs: Procs, pki: dict[str, Path]
) -> None:
    env = {tls.ENV_DIR: str(pki["replica"])}
    replicas = [
        procs.replica("examples.counter:Counter", name=f"r{i}", env=env, wait=False)
        for i in range(2)
    ]
    router = procs.router(
        replicas, "--tls-server-name", NAME, env={tls.ENV_DIR: str(pki["router"])}
    )
    assert await _states(router.url, "HEALTHY") == ["HEALTHY", "HEALTHY"]
    async with ServiceClient(router.url, token=TOKEN) as client:
        assert [await client.incr.route(1) for _ in range(4)] == [1, 1, 2, 2]
        assert sorted(await client.call_all("value")) == [2, 2]
        sid = await client.start_session()
        holder = (await client.whoami.route(sess_id=sid))["replica"]
        assert {(await client.whoami.route(sess_id=sid))["replica"] for _ in range(5)} == {holder}
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
            http.get(router.url + "/v1/metrics") as resp,
        ):
            relay = (await resp.json())["relay"]
        if relay["kind"] == "native":  # the Rust relay spoke TLS itself, not through Python
            assert relay["relayed"] >= 4, relay
    for replica in replicas:  # plain HTTP gets no answer: the handshake fails first
        with pytest.raises(OSError):
            http_get(replica.url + "/healthz")


@pytest.mark.parametrize("which", ["another CA", "another name"])
async def test_a_router_that_cannot_verify_the_replicas_reaches_none(
    procs: Procs, pki: dict[str, Path], which: str
) -> None:
    env = {tls.ENV_DIR: str(pki["replica"])}
    replica = procs.replica("examples.counter:Counter", name="lonely", env=env, wait=False)
    trust, name = (
        (pki["stranger"], NAME)
        if which == "another CA"
        else (pki["router"], "x.kubeforge.internal")
    )
    router = procs.router([replica], "--tls-server-name", name, env={tls.ENV_DIR: str(trust)})
    async with ServiceClient(router.url, token=TOKEN) as client:
        deadline = time.monotonic() + 20
        while True:  # until the replica listens and the handshake is what fails
            (seen,) = await client.replicas()
            if "certificate verify failed" in seen["reason"]:
                break
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.1)
        assert seen["state"] == "UNHEALTHY"
        with pytest.raises(NoHealthyReplicasError):
            await client.incr.route(1)


def _serial(url: str) -> int:
    """The serial of the certificate a replica presents to a new connection."""
    import socket
    import ssl

    from cryptography import x509

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # only reading it
    host, port = url.removeprefix("http://").split(":")
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=NAME) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_a_pending_certificate_is_waited_for_and_a_renewal_is_loaded_under_load(
    procs: Procs, tmp_path: Path
) -> None:
    """cert-manager's way: the Secret exists before its certificate (empty keys), then a
    renewal from the same CA replaces it; replicas load it with no call failing."""
    from cryptography import x509

    first, renewed = tls.issue_series("svc", "ns", datetime.datetime.now(datetime.UTC), 2)
    replica_dir = _write(tmp_path / "replica", tls.PENDING)
    router_dir = _write(tmp_path / "router", {tls.KEY_CA: b""})
    replica = procs.replica(
        "examples.counter:Counter", name="r0", env={tls.ENV_DIR: str(replica_dir)}, wait=False
    )
    router = procs._spawn(
        ["-m", "kubeforge.router", "--replica", replica.url, "--tls-server-name", NAME],
        free_port(),
        "router",
        {tls.ENV_DIR: str(router_dir)},
    )
    deadline = time.monotonic() + 20
    while not all("waiting for" in p.log_text() for p in (replica, router)):
        assert time.monotonic() < deadline, (replica.log_text(), router.log_text())
        await asyncio.sleep(0.1)
    with pytest.raises(OSError):  # nothing listens without a certificate
        _serial(replica.url)
    for key, data in first.items():
        (replica_dir / key).write_bytes(data)
    (router_dir / tls.KEY_CA).write_bytes(first[tls.KEY_CA])
    procs.wait_ready(router)
    assert await _states(router.url, "HEALTHY") == ["HEALTHY"]
    old = x509.load_pem_x509_certificate(first[tls.KEY_CERT]).serial_number
    new = x509.load_pem_x509_certificate(renewed[tls.KEY_CERT]).serial_number
    assert _serial(replica.url) == old
    load = SteadyCalls(router.url, TOKEN)
    await asyncio.sleep(0.5)
    # Written one file at a time, as a careless writer would: a certificate whose key has not
    # arrived yet is not loaded.
    (replica_dir / tls.KEY_CERT).write_bytes(renewed[tls.KEY_CERT])
    await asyncio.sleep(1.5)
    (replica_dir / tls.KEY_KEY).write_bytes(renewed[tls.KEY_KEY])
    deadline = time.monotonic() + 10
    while (serial := await asyncio.to_thread(_serial, replica.url)) != new:
        assert serial == old
        assert time.monotonic() < deadline, replica.log_text()
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)
    await load.stop()
    assert load.failed == [] and load.calls > 50, (load.calls, load.failed[:3])
    log = replica.log_text()
    assert "TLS certificate reloaded" in log and "not reloaded" in log, log
