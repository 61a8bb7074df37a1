"""kubeforge's binary body format (kubeforge.values), with real numpy and real torch."""

from __future__ import annotations

import dataclasses
import enum
import struct
import subprocess
import sys
import textwrap
from typing import Any, NamedTuple

import msgpack
import numpy as np
import pydantic
import pytest
import torch

from examples.tensors import Batch, Completion, Episode, Role, Tensors, double
from kubeforge import values
from kubeforge.values import Allowed, ValueFormatError

TORCH_DTYPES = [
    getattr(torch, name)
    for name, (_, numpy_name) in values.describe_types().items()
    if isinstance(getattr(torch, name, None), torch.dtype)
]
NUMPY_DTYPES = [n for _, n in values.describe_types().values() if n is not None]


def round_trip(value: Any, allowed: Allowed | None = None, writable: bool = True) -> Any:
    raw = values.encode(value).tobytes()
    return values.decode(bytearray(raw) if writable else raw, allowed)


def random_bytes_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Any bit pattern of the dtype (NaNs and all), to prove the bytes are carried exactly."""
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (int(np.prod(shape)) * size,), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_every_torch_dtype_arrives_bit_exact(dtype: torch.dtype) -> None:
    for shape in [(), (0,), (3,), (2, 3, 5), (1, 300)]:
        t = random_bytes_tensor(dtype, shape)
        out = round_trip(t)
        assert isinstance(out, torch.Tensor)
        assert out.dtype == dtype and tuple(out.shape) == shape
        assert (
            torch.equal(out.view(torch.uint8), t.view(torch.uint8))
            if t.dim()
            else (
                out.reshape(1).view(torch.uint8).tolist() == t.reshape(1).view(torch.uint8).tolist()
            )
        )


def test_bfloat16_and_float8_are_covered() -> None:
    names = {str(d) for d in TORCH_DTYPES}
    assert {"torch.bfloat16", "torch.float8_e4m3fn", "torch.float8_e5m2"} <= names


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_every_numpy_dtype_arrives_bit_exact(dtype: str) -> None:
    arr = np.frombuffer(np.random.bytes(np.dtype(dtype).itemsize * 24), dtype=dtype)
    arr = arr.reshape(2, 3, 4)
    out = round_trip(arr)
    assert type(out) is np.ndarray and out.dtype == arr.dtype and out.shape == (2, 3, 4)
    assert out.tobytes() == arr.tobytes()
    scalar = arr.reshape(-1)[0]
    back = round_trip(scalar)
    assert type(back) is type(scalar) and back.tobytes() == scalar.tobytes()


def test_big_endian_and_non_contiguous_input_is_made_contiguous() -> None:
    be = np.arange(100, dtype=">i4")
    assert np.array_equal(round_trip(be), be)
    t = torch.arange(600, dtype=torch.float32).reshape(20, 30).t()[::2]
    assert not t.is_contiguous()
    out = round_trip(t)
    assert torch.equal(out, t) and out.is_contiguous()
    a = np.arange(1000.0).reshape(10, 100)[:, ::3]
    assert np.array_equal(round_trip(a), a)


def test_decoded_arrays_are_writable_views_of_the_body() -> None:
    t = torch.randn(1000, 100)
    a = np.random.rand(500, 20)
    raw = bytearray(values.encode({"t": t, "a": a}).tobytes())
    out = values.decode(raw)
    body = np.frombuffer(raw, np.uint8)
    assert np.shares_memory(out["a"], body)
    assert out["a"].flags.writeable
    out["t"].add_(1)  # torch code mutates its inputs in place
    assert torch.allclose(out["t"], t + 1)
    assert out["t"].data_ptr() - body.ctypes.data in range(len(raw))
    assert out["t"].data_ptr() % values.ALIGN == body.ctypes.data % values.ALIGN


def test_a_read_only_body_still_gives_writable_arrays() -> None:
    out = round_trip({"a": np.ones(1000), "t": torch.ones(1000)}, writable=False)
    out["a"] += 1
    out["t"].add_(1)
    assert out["a"][0] == 2 and out["t"][0] == 2


def test_encoding_hands_over_the_arrays_own_memory() -> None:
    a = np.random.rand(1 << 20)
    t = torch.randn(1 << 18)
    enc = values.encode([a, t])
    views = [p for p in enc.parts if isinstance(p, memoryview) and p.nbytes > 4096]
    assert len(views) == 2
    assert np.shares_memory(np.frombuffer(views[0], np.uint8), a)
    assert np.frombuffer(views[1], np.uint8).ctypes.data == t.data_ptr()
    assert enc.nbytes == sum(memoryview(p).nbytes for p in enc.parts)


def test_tensors_cross_where_numpy_is_not_installed() -> None:
    """torch runs without numpy, and images with torch often lack it (a replica on kind did):
    tensors of every size still encode from their own memory and decode bit-exact."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["numpy"] = None  # import numpy -> ImportError, as where it is missing
        import torch
        from kubeforge import values
        big = torch.randn(1 << 18)
        small = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
        enc = values.encode([big, small, torch.empty(0)])
        view = next(p for p in enc.parts if isinstance(p, memoryview) and p.nbytes > 4096)
        assert view.nbytes == big.nbytes, view.nbytes
        del enc
        out = values.decode(bytearray(values.encode([big, small, torch.empty(0)]).tobytes()))
        assert torch.equal(out[0], big) and torch.equal(out[1], small), out
        assert out[2].shape == (0,)
        assert "numpy" not in {m for m in sys.modules if sys.modules[m] is not None}
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_buffers_are_aligned() -> None:
    raw = values.encode([np.ones(100, np.float64), b"x" * 1000, torch.ones(77)]).tobytes()
    _, _, _, _, count = struct.unpack_from("<3sBIQQ", raw)
    for i in range(count):
        offset, _length = struct.unpack_from("<QQ", raw, 24 + 16 * i)
        assert offset % values.ALIGN == 0


def test_a_tensor_from_another_device_arrives_on_the_cpu() -> None:
    """The header names the device a tensor came from; the receiver gets a CPU tensor (the
    GPU check sends real CUDA tensors)."""
    header = values._tensor_header(torch.ones(10), values._Packer([], False))
    assert header[4] is None
    sent = array_ext("float32", [2], b"\0" * 8, lib=values.LIB_TORCH)
    moved = msgpack.ExtType(
        values.EXT_ARRAY, msgpack.packb([1, "float32", [2], b"\0" * 8, "cuda:3"])
    )
    for ext in (sent, moved):
        out = values.decode(bytearray(message(ext)))
        assert out.device.type == "cpu" and out.shape == (2,)


def test_plain_values_keep_their_types() -> None:
    value = {
        "none": None,
        "tuple": (1, (2, 3), []),
        "bytes": b"\x00\xff" * 1000,
        "small bytes": b"ab",
        "int keys": {1: "a", (2, 3): "b"},
        "big": 2**100,
        "neg": -(2**70),
        "complex": 1 - 2j,
        "set": {1, 2},
        "frozenset": frozenset({"a"}),
        "nested": [[{"x": (1.5,)}]],
        "bool": True,
    }
    out = round_trip(value)
    assert out == value
    assert type(out["tuple"]) is tuple and type(out["tuple"][1]) is tuple
    assert type(out["bytes"]) is bytes and type(out["set"]) is set


def test_allowed_classes_arrive_as_the_same_class() -> None:
    comp = Completion(torch.arange(4), torch.arange(6), torch.randn(6, dtype=torch.bfloat16))
    ep = Episode("e1", comp, 0.5, [1.0], Role.REFERENCE)
    allowed = Allowed.from_hints(Tensors.score, Tensors.collate)
    out = round_trip(ep, allowed)
    assert type(out) is Episode and type(out.completion) is Completion
    assert out.role is Role.REFERENCE
    assert torch.equal(out.completion.logprobs, comp.logprobs)
    batch = Batch({"input_ids": torch.ones(2, 3)}, (torch.zeros(2),))
    back = round_trip(batch, allowed)
    assert type(back) is Batch and type(back.targets) is tuple


class Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
    name: str
    weights: torch.Tensor
    inner: list[Point] = []


class Point(NamedTuple):
    x: int
    y: int


Model.model_rebuild()


def test_pydantic_models_holding_tensors() -> None:
    m = Model(name="m", weights=torch.eye(3), inner=[Point(1, 2)])
    out = round_trip(m, Allowed.from_hints(lambda_free_hint))
    assert type(out) is Model and type(out.inner[0]) is Point
    assert torch.equal(out.weights, torch.eye(3))


def lambda_free_hint(m: Model) -> None:
    """Hints name the model; the walk finds Point through its field."""


def test_a_class_the_receiver_does_not_allow_is_refused_by_name() -> None:
    ep = Episode("e1", None)
    raw = bytearray(values.encode(ep).tobytes())
    with pytest.raises(ValueFormatError, match=r"class examples.tensors:\w+ is not allowed"):
        values.decode(raw)


def test_registration_allows_a_class_everywhere() -> None:
    @dataclasses.dataclass
    class Local:
        x: int

    with pytest.raises(ValueFormatError):
        round_trip(Local(1))
    values.register_type(Local)
    try:
        assert round_trip(Local(1)) == Local(1)
    finally:
        values._REGISTERED.pop(values.class_key(Local))
    with pytest.raises(TypeError, match="only those cross by value"):
        values.register_type(int)


def test_a_receiver_never_imports_a_class_a_sender_names() -> None:
    """The skeleton names `os:system` and a module never imported: nothing is imported."""
    code = textwrap.dedent(
        """
        import sys, msgpack
        from kubeforge import values
        imports = []
        sys.addaudithook(lambda ev, args: imports.append(args[0]) if ev == "import" else None)
        for key in ("os:system", "kubeforge_never_imported_xyz:Thing"):
            obj = msgpack.ExtType(values.EXT_OBJECT, msgpack.packb([0, key, {}]))
            skeleton = msgpack.packb(obj)
            body = values._HEAD.pack(values.MAGIC, 1, 0, len(skeleton), 0) + skeleton
            try:
                values.decode(body)
            except values.ValueFormatError as exc:
                print("refused:", exc)
        print("imported:", imports)
        assert "kubeforge_never_imported_xyz" not in sys.modules
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.count("refused:") == 2
    assert "imported: []" in out.stdout


def test_no_decode_path_calls_pickle() -> None:
    """Every decoder (arrays, tensors, objects, nested messages, trusted constructor
    arguments) runs with pickle's entry points replaced by ones that fail the test."""
    code = textwrap.dedent(
        """
        import pickle, _pickle, sys, copyreg
        import numpy, torch
        from examples.tensors import Episode, Completion, Tensors, double
        from kubeforge import values
        def trap(*a, **k):
            raise AssertionError("pickle was called")
        for mod in (pickle, _pickle):
            for name in ("loads", "load", "Unpickler", "dumps", "dump", "Pickler"):
                setattr(mod, name, trap)
        found = []
        sys.addaudithook(lambda ev, args: found.append(ev) if ev.startswith("pickle") else None)
        ep = Episode("e", Completion(torch.ones(3), torch.ones(2), torch.ones(2)), 1.0)
        value = {"np": numpy.ones((30, 30)), "t": torch.ones(40, 40, dtype=torch.bfloat16),
                 "ep": ep, "s": numpy.float32(1)}
        allowed = values.Allowed.from_hints(Tensors.score)
        inner = values.encode(value).tobytes()
        outer = values.encode({"r": values.Message(0)}, messages=[inner]).tobytes()
        values.decode(bytearray(outer), allowed)
        init = values.encode({"args": [double, Episode]}, trusted=True).tobytes()
        values.decode(bytearray(init), trusted=True)
        assert not found, found
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_constructor_arguments_cross_by_import_path() -> None:
    raw = values.encode({"f": double, "cls": Episode, "t": torch.ones(2)}, trusted=True)
    out = values.decode(bytearray(raw.tobytes()), trusted=True)
    assert out["f"] is double and out["cls"] is Episode
    with pytest.raises(ValueFormatError, match="only as constructor arguments"):
        values.decode(bytearray(raw.tobytes()))


def test_non_importable_callables_are_refused_with_the_reason() -> None:
    def local_fn(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="a lambda cannot be a constructor argument"):
        values.encode([lambda x: x], trusted=True)
    with pytest.raises(TypeError, match="defined inside a function"):
        values.encode([local_fn], trusted=True)
    with pytest.raises(TypeError, match="cannot be sent to an endpoint"):
        values.encode([double])  # not trusted: calls never carry functions


def test_unsendable_values_say_what_can_be_sent() -> None:
    with pytest.raises(TypeError, match="dtype object cannot be sent"):
        values.encode(np.array([object()]))
    with pytest.raises(TypeError, match="values of type"):
        values.encode(object())
    with pytest.raises(TypeError, match="layout"):
        values.encode(torch.eye(3).to_sparse())


# bad input: each is a ValueFormatError (a 400 on the wire), never a crash ----------------


def message(skeleton_value: Any, buffers: list[tuple[int, int]] = (), extra: bytes = b"") -> bytes:
    skeleton = msgpack.packb(skeleton_value, use_bin_type=True)
    head = struct.pack("<3sBIQQ", b"KFB", 1, 0, len(skeleton), len(buffers))
    table = b"".join(struct.pack("<QQ", o, n) for o, n in buffers)
    return head + table + skeleton + extra


def array_ext(dtype: str, shape: list[int], src: Any, lib: int = 0) -> msgpack.ExtType:
    return msgpack.ExtType(values.EXT_ARRAY, msgpack.packb([lib, dtype, shape, src, None]))


BAD_BODIES = {
    "shape and dtype disagree with the bytes": message(array_ext("float32", [3, 3], b"\0" * 8)),
    "offset out of range": message(array_ext("uint8", [100], 0), [(10_000, 100)]),
    "length out of range": message(array_ext("uint8", [100], 0), [(128, 1 << 40)]),
    "buffer index out of range": message(array_ext("uint8", [4], 7)),
    "unknown dtype": message(array_ext("float128x", [1], b"\0" * 16)),
    "object dtype": message(array_ext("object", [1], b"\0" * 8)),
    "negative dimension": message(array_ext("uint8", [-1], b"")),
    "too many dimensions": message(array_ext("uint8", [1] * 40, b"\0")),
    "element-count bomb": message(array_ext("float64", [2**40, 2**40], b"\0" * 8)),
    "class not allowed": message(
        msgpack.ExtType(values.EXT_OBJECT, msgpack.packb([0, "builtins:object", {}]))
    ),
    "import in a call": message(msgpack.ExtType(values.EXT_IMPORT, msgpack.packb("os:system"))),
    "unknown extension": message(msgpack.ExtType(99, b"")),
    "bad magic": b"XYZ" + message(None)[3:],
    "bad version": message(None)[:3] + b"\x07" + message(None)[4:],
    "truncated head": message(None)[:10],
    "truncated skeleton": message(list(range(100)))[:-5],
    "skeleton length past the end": message(None)[:8]
    + struct.pack("<Q", 1 << 50)
    + message(None)[16:],
    "buffer count bomb": message(None)[:16] + struct.pack("<Q", 1 << 60) + message(None)[24:],
    "unhashable set member": message(msgpack.ExtType(values.EXT_SET, msgpack.packb([[1, 2]]))),
    "big integer bomb": message(msgpack.ExtType(values.EXT_BIGINT, msgpack.packb("9" * 10**5))),
}


def nesting_bomb(depth: int) -> bytes:
    inner = msgpack.packb(None)
    for _ in range(depth):
        inner = msgpack.packb(msgpack.ExtType(values.EXT_TUPLE, b"\x91" + inner))
    return message(msgpack.ExtType(values.EXT_TUPLE, b"\x91" + inner))


def raw_skeleton(skeleton: bytes) -> bytes:
    return struct.pack("<3sBIQQ", b"KFB", 1, 0, len(skeleton), 0) + skeleton


BAD_BODIES["nesting bomb (tuples)"] = nesting_bomb(10_000)
BAD_BODIES["nesting bomb (lists)"] = raw_skeleton(b"\x91" * 100_000 + b"\xc0")
BAD_BODIES["element-count bomb (list)"] = raw_skeleton(b"\xdd\xff\xff\xff\xff")


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_malformed_messages_are_refused_with_a_reason(case: str) -> None:
    body = BAD_BODIES[case]
    with pytest.raises(ValueFormatError) as err:
        values.decode(bytearray(body))
    assert str(err.value)


def test_nesting_within_the_limit_decodes() -> None:
    value: Any = 1
    for _ in range(values.MAX_DEPTH - 2):
        value = (value,)
    assert round_trip(value) == value
    with pytest.raises(ValueError, match="nested deeper"):
        deep: Any = 1
        for _ in range(values.MAX_DEPTH + 2):
            deep = (deep,)
        values.encode(deep)


class Colour(enum.Enum):
    RED = 1


def test_an_enum_value_the_class_does_not_have_is_refused() -> None:
    raw = message(msgpack.ExtType(values.EXT_ENUM, msgpack.packb([values.class_key(Colour), 7])))
    with pytest.raises(ValueFormatError):
        values.decode(bytearray(raw), Allowed([Colour]))


def test_a_manifest_names_functions_and_classes_with_import() -> None:
    args = [{"$import": "examples.tensors:double"}, {"cls": {"$import": "examples.tensors:Role"}}]
    out = values.resolve_imports(args)
    assert out[0] is double and out[1]["cls"] is Role
    assert values.resolve_imports({"$import": 1, "x": 2}) == {"$import": 1, "x": 2}
    with pytest.raises(ValueError, match="cannot import"):
        values.resolve_imports({"$import": "examples.tensors:nope"})


def test_to_device_moves_every_tensor_in_containers_and_dataclasses() -> None:
    ep = Episode("e", Completion(torch.ones(2), torch.ones(2), torch.ones(2)))
    out = values.to_device([torch.ones(1), (torch.ones(1),), {"a": ep}], "meta")
    assert out[0].is_meta and out[1][0].is_meta and out[2]["a"].completion.logprobs.is_meta


def test_a_script_class_matches_where_a_pod_imports_it_as_a_module() -> None:
    """examples/grpo.py runs as __main__ on the caller and is `examples.grpo` in the pods: the
    same allowed class on both sides, matched by qualified name, never by import."""

    @dataclasses.dataclass
    class Thing:
        x: int

    Thing.__module__ = "examples.somewhere"
    allowed = Allowed([Thing])
    assert (
        allowed.get(
            "__main__:test_a_script_class_matches_where_a_pod_imports_it_as_a_module.<locals>.Thing"
        )
        is Thing
    )
    Thing.__module__ = "__main__"
    as_main = Allowed([Thing])
    assert as_main.get("examples.somewhere:" + Thing.__qualname__) is Thing
    assert as_main.get("other.module:Nope") is None
    assert Allowed().get("__main__:" + Thing.__qualname__) is None  # nothing allowed: nothing
