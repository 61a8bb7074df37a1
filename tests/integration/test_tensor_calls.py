"""Tensors, arrays and dataclasses through real replicas: the local Service (in-process
router) and ServiceClient against a router process, on both call paths (this tier runs again
with KUBEFORGE_RELAY=python)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
import torch

from examples.tensors import Batch, Completion, Episode, Role, Tensors, double
from kubeforge import RemoteError, Service, ServiceClient, ServiceConfig, values, wire
from kubeforge.errors import BadRequestError, InvalidArgumentsError
from kubeforge.local import LocalDeployment, ReplicaSet, free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def deployment() -> Any:
    """`kubeforge run` of the Tensors actor: 2 replicas behind a router process, with JSON
    constructor arguments as a manifest gives them (a function named by `$import`)."""
    kwargs = {"scale": 2.0, "transform": {"$import": "examples.tensors:double"}}
    dep = LocalDeployment(
        ReplicaSet(actor="examples.tensors:Tensors", replicas=2, kwargs=kwargs),
        port=free_port(),
    )
    dep.start(progress=lambda _m: None)
    try:
        yield dep
    finally:
        dep.stop()


@pytest.fixture(params=["local", "router"])
async def api(request: pytest.FixtureRequest, deployment: Any) -> AsyncIterator[Any]:
    if request.param == "local":
        svc = Service(ServiceConfig(num_replicas=2), Tensors, scale=2.0)
        await svc.start()
        try:
            yield svc
        finally:
            await svc.stop()
    else:
        async with ServiceClient(deployment.url, actor=Tensors) as client:
            yield client


def episode(n: int = 6) -> Episode:
    comp = Completion(
        torch.arange(4), torch.arange(n), torch.full((n,), 0.5, dtype=torch.bfloat16), "hi"
    )
    return Episode("e-1", comp, 0.0, [], Role.REFERENCE)


async def test_tensors_keep_dtype_shape_and_bits(api: Any) -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int64, torch.bool):
        t = torch.randint(0, 256, (2, 3, 16), dtype=torch.uint8).view(dtype)
        out = await api.echo(None, t)
        assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == t.shape
        assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))
    arr = np.arange(8, dtype=np.float16).reshape(2, 4)  # the first row
    back = await api.echo(None, arr)
    assert type(back) is np.ndarray and back.dtype == np.float16 and back.shape == (2, 4)
    seen = await api.describe(None, arr)
    assert seen == {"type": "ndarray", "dtype": "float16", "shape": [2, 4], "writable": True}


async def test_the_actor_gets_writable_tensors_and_mutates_them(api: Any) -> None:
    t = torch.zeros(100_000)  # large: carried out of line, a view of the received body
    out = await api.add_in_place.route(t, 1.5)
    assert torch.all(out == 1.5) and torch.all(t == 0)  # the caller's tensor is its own


async def test_a_non_contiguous_tensor_arrives_contiguous(api: Any) -> None:
    t = torch.arange(600.0).reshape(20, 30).t()
    seen = await api.describe(None, t)
    assert seen["contiguous"] and seen["shape"] == [30, 20]
    assert torch.equal(await api.echo(None, t), t)


async def test_dataclasses_holding_tensors_arrive_as_their_classes(api: Any) -> None:
    scored = await api.score(None, episode())
    assert type(scored) is Episode and type(scored.completion) is Completion
    assert scored.role is Role.REFERENCE and scored.completion.text == "hi"
    assert scored.reward == pytest.approx(6.0)  # 6 x 0.5, x scale 2.0 from the kwargs
    assert scored.completion.logprobs.dtype == torch.bfloat16
    batch = await api.collate(None, [episode(), episode()])
    assert type(batch) is Batch and type(batch.targets) is tuple
    assert batch.inputs["input_ids"].shape == (2, 6)


async def test_tuples_bytes_and_nesting_survive(api: Any) -> None:
    value = ({"a": (torch.ones(2), b"\x00" * 1000)}, [None, (1, 2.5)], b"raw", {3: "int key"})
    out = await api.echo(None, value)
    assert type(out) is tuple and type(out[0]["a"]) is tuple and out[3] == {3: "int key"}
    assert torch.equal(out[0]["a"][0], torch.ones(2)) and out[0]["a"][1] == b"\x00" * 1000


async def test_a_64_mib_tensor_round_trips(api: Any) -> None:
    t = torch.randn(16 << 20)  # 64 MiB of float32: past the old 64 MiB JSON limit once encoded
    out = await api.echo(None, t)
    assert torch.equal(out, t)


async def test_broadcast_returns_each_replicas_tensors_in_order(api: Any) -> None:
    state = {f"layer{i}.weight": torch.full((256, 256), float(i)) for i in range(4)}
    sums = await api.checksum.fanout(state)
    assert sums == [pytest.approx(256 * 256 * 6.0)] * 2
    echoed = await api.call_all("echo", state)
    assert len(echoed) == 2 and all(
        torch.equal(e["layer3.weight"], state["layer3.weight"]) for e in echoed
    )


async def test_a_class_the_caller_does_not_allow_is_refused() -> None:
    """A client made without the actor class cannot rebuild Episode: it says so."""
    svc = Service(ServiceConfig(num_replicas=1), Tensors)
    await svc.start()
    try:
        svc.allowed = values.Allowed()  # as a caller that does not know the actor
        with pytest.raises(BadRequestError, match="Episode is not allowed"):
            await svc.score(None, episode())
    finally:
        await svc.stop()


async def test_wrong_types_get_a_422_naming_the_argument(api: Any) -> None:
    with pytest.raises(InvalidArgumentsError, match="argument 'n' of typed must be int, got str"):
        await api.typed(None, "three", 1.0, torch.ones(1))
    with pytest.raises(InvalidArgumentsError, match="argument 't' of typed must be Tensor"):
        await api.typed(None, 3, 1.0, np.ones(1))
    assert await api.typed(None, 3, 1, torch.ones(2, 2), name="x") == "3 1 (2, 2) x"


async def test_an_endpoint_refuses_a_class_its_hints_do_not_name(deployment: Any) -> None:
    """Episode sent to an endpoint whose hints do not name it: a 400 naming the class."""
    async with ServiceClient(deployment.url, actor=Tensors) as client:
        with pytest.raises(BadRequestError, match=r"examples.tensors:\w+ is not allowed"):
            await client.echo(None, episode())


async def test_json_callers_get_nested_lists(deployment: Any) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{deployment.url}/v1/call/echo", json={"args": [[[1.5, 2.0]]]}
        ) as resp:
            assert resp.status == 200 and (await resp.json()) == {"result": [[1.5, 2.0]]}
        async with http.post(
            f"{deployment.url}/v1/call/add_in_place", json={"args": [[1.0], 1.0]}
        ) as resp:
            body = await resp.json()
            assert resp.status == 422 and "argument 't' of add_in_place" in body["error"]["message"]
    async with ServiceClient(deployment.url, body_format="json") as client:
        assert await client.echo(None, np.arange(3)) == [0, 1, 2]


async def test_malformed_binary_bodies_get_a_400_and_the_replica_keeps_serving(
    deployment: Any,
) -> None:
    body = values.encode({"args": [torch.ones(100)], "kwargs": {}}).tobytes()
    bad = bytearray(body)
    bad[-100:] = b""  # truncated: the last array ends past the body
    headers = {"Content-Type": wire.BINARY.decode()}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{deployment.url}/v1/call/echo", data=bytes(bad), headers=headers
        ) as resp:
            text = await resp.text()
            assert resp.status == 400 and "truncated" in text, text
        async with http.post(f"{deployment.url}/v1/call/echo", data=body, headers=headers) as r:
            assert r.status == 200
            out = values.decode(bytearray(await r.read()))
            assert torch.equal(out["result"], torch.ones(100))


async def test_constructor_arguments_cross_by_import_path_and_value() -> None:
    svc = Service(ServiceConfig(num_replicas=1), Tensors, double, scale=0.5)
    async with svc:
        assert torch.equal(await svc.apply(None, torch.ones(3)), torch.full((3,), 2.0))
        scored = await svc.score(None, episode())
        assert scored.reward == pytest.approx(1.5)
    init = torch.arange(5)
    async with Service(ServiceConfig(num_replicas=1), Tensors, None, scale=2.0) as svc2:
        assert torch.equal(await svc2.echo(None, init), init)


def test_a_lambda_constructor_argument_is_refused_before_anything_starts() -> None:
    with pytest.raises(TypeError, match="a lambda cannot be a constructor argument"):
        Service(ServiceConfig(num_replicas=1), Tensors, lambda x: x)
    with pytest.raises(TypeError, match="a lambda cannot be a constructor argument"):
        Service(ServiceConfig(num_replicas=1), Tensors, transform=lambda x: x)


async def test_an_endpoint_exception_still_arrives_typed(api: Any) -> None:
    with pytest.raises(RemoteError, match="AssertionError"):
        await api.score(None, Episode("e", None))


async def test_results_that_cannot_be_sent_say_why(api: Any) -> None:
    with pytest.raises(TypeError, match="cannot be sent"):
        await api.echo(None, object())


async def test_an_endpoint_that_asks_for_a_device_gets_its_tensors_there(api: Any) -> None:
    """Tensors arrive on the CPU unless the endpoint names a device (`meta` here, `cuda` on a
    GPU machine): then every tensor among its arguments is moved there first."""
    assert await api.where(None, torch.ones(3), episode()) == ["meta", "meta"]
    seen = await api.describe(None, torch.ones(3))
    assert seen["device"] == "cpu"


async def test_a_manifest_names_a_function_with_import(deployment: Any) -> None:
    async with ServiceClient(deployment.url, actor=Tensors) as client:
        assert torch.equal(await client.apply(None, torch.ones(2)), torch.full((2,), 2.0))
