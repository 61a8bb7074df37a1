"""kubeforge's binary body format: Python values arrive as they were sent, never by pickle.

The layout (docs/wire-format.md is the reference):

    head      24 bytes: b"KFB", version 1, flags u32 (0), skeleton length S u64, buffers N u64
    table     N x 16 bytes: (offset u64, length u64) of each buffer, from the message's start
    skeleton  S bytes of msgpack: the value, with arrays and large bytes as references
    buffers   each at an offset that is a multiple of 64, zero padding between

Arrays travel out of line so that decoding makes views over the received buffer (writable when
the buffer is, as torch code expects) and encoding hands the socket the arrays' own memory:
`encode()` returns the parts to write, not one concatenated copy.

Classes are rebuilt only from what the receiver allows (`Allowed`): an endpoint's type hints,
the actor class a handle was made for, or `register_type()`. The skeleton names a class; the
receiver looks the name up in its allowed set and never imports it. Constructor arguments are
the one exception (`trusted=True`): they come from whoever starts the replica (the user's own
program or the Service manifest), so module-level functions and classes cross by import path.

numpy and torch are imported only when a value needs them: the router, which relays bodies
without decoding them, does not need either.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import importlib
import inspect
import struct
import sys
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

import msgpack

from kubeforge import contract

MAGIC = contract.BINARY_MAGIC
VERSION = contract.BINARY_VERSION
ALIGN = contract.BINARY_ALIGN
CONTENT_TYPE = contract.BINARY_MEDIA
INLINE_MAX = 256  # arrays and bytes up to this size travel inside the skeleton
MAX_DEPTH = 64  # containers and objects nested deeper than this are refused
MAX_NDIM = 32

_HEAD = struct.Struct("<3sBIQQ")
_ENTRY = struct.Struct("<QQ")
_ZEROS = memoryview(bytes(ALIGN))

# Extension type codes in the skeleton.
EXT_ARRAY = 1  # [lib, dtype, shape, buffer index | inline bytes, device]
EXT_TUPLE = 2  # [items...]
EXT_OBJECT = 3  # [kind, class key, fields]
EXT_ENUM = 4  # [class key, value]
EXT_IMPORT = 5  # "module:qualname" (constructor arguments only)
EXT_SET = 6
EXT_FROZENSET = 7
EXT_COMPLEX = 8  # [real, imag]
EXT_BIGINT = 9  # decimal text of an int beyond 64 bits
EXT_BYTES = 10  # buffer index of bytes carried out of line
# buffer index of a whole message inside this one (a broadcast's replies)
EXT_MESSAGE = contract.EXT_MESSAGE

LIB_NUMPY, LIB_TORCH, LIB_NUMPY_SCALAR = 0, 1, 2
OBJ_DATACLASS, OBJ_PYDANTIC, OBJ_NAMEDTUPLE = 0, 1, 2

# Every dtype that may cross: its size, and its name in numpy and torch (None: not there).
# bfloat16 and the float8 types exist in torch only; a numpy receiver gets them as torch.
_DTYPES: dict[str, tuple[int, str | None]] = {
    "bool": (1, "bool"),
    "uint8": (1, "uint8"),
    "int8": (1, "int8"),
    "uint16": (2, "uint16"),
    "int16": (2, "int16"),
    "uint32": (4, "uint32"),
    "int32": (4, "int32"),
    "uint64": (8, "uint64"),
    "int64": (8, "int64"),
    "float16": (2, "float16"),
    "float32": (4, "float32"),
    "float64": (8, "float64"),
    "complex64": (8, "complex64"),
    "complex128": (16, "complex128"),
    "complex32": (4, None),
    "bfloat16": (2, None),
    "float8_e4m3fn": (1, None),
    "float8_e4m3fnuz": (1, None),
    "float8_e5m2": (1, None),
    "float8_e5m2fnuz": (1, None),
    "float8_e8m0fnu": (1, None),
    "float4_e2m1fn_x2": (1, None),
}


class ValueFormatError(ValueError):
    """A body that is not a well-formed message, or holds something the receiver refuses."""


# allowed classes ----------------------------------------------------------------------------


def class_key(cls: type) -> str:
    """How a class is named on the wire. A user's script is `__main__` in the caller and
    `__mp_main__` in a replica that loaded it: both are `__main__` here."""
    module = cls.__module__
    if module == "__mp_main__":
        module = "__main__"
    return f"{module}:{cls.__qualname__}"


_REGISTERED: dict[str, type] = {}


def register_type(cls: type) -> type:
    """Let values of `cls` (a dataclass, pydantic model, enum or NamedTuple) be rebuilt in this
    process wherever they arrive. Usable as a class decorator."""
    if not _kind_of(cls):
        raise TypeError(
            f"{cls.__qualname__} is not a dataclass, pydantic model, enum or NamedTuple; "
            "only those cross by value"
        )
    _REGISTERED[class_key(cls)] = cls
    return cls


def _kind_of(cls: type) -> str | None:
    if isinstance(cls, type):
        if issubclass(cls, enum.Enum):
            return "enum"
        if dataclasses.is_dataclass(cls):
            return "dataclass"
        if issubclass(cls, tuple) and hasattr(cls, "_fields"):
            return "namedtuple"
        if _is_pydantic(cls):
            return "pydantic"
    return None


def _is_pydantic(cls: type) -> bool:
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(cls, type) and issubclass(cls, pydantic.BaseModel)


class Allowed:
    """The classes a receiver rebuilds: those named here, and every registered one."""

    def __init__(self, classes: Iterable[type] = ()) -> None:
        self.classes: dict[str, type] = {}
        for cls in classes:
            self.add(cls)

    def add(self, cls: type) -> None:
        self.classes[class_key(cls)] = cls

    def get(self, key: str) -> type | None:
        """The allowed class `key` names. A user's script is `__main__` where it runs and a
        module where a pod imports it (`examples.grpo`), so a key on either side that says
        `__main__` matches an allowed class of the same qualified name, when only one has it."""
        found = self.classes.get(key) or _REGISTERED.get(key)
        if found is not None:
            return found
        module, _, qualname = key.partition(":")
        same = {
            cls
            for k, cls in (*self.classes.items(), *_REGISTERED.items())
            if k.endswith(":" + qualname) and (module == "__main__" or k.startswith("__main__:"))
        }
        return same.pop() if len(same) == 1 else None

    @classmethod
    def from_hints(cls, *functions: Callable[..., Any]) -> Allowed:
        """Every class reachable from the functions' annotations: parameters and returns,
        through containers, unions, and the fields of the classes found."""
        allowed = cls()
        seen: set[int] = set()
        for fn in functions:
            for hint in type_hints(fn).values():
                _collect(hint, allowed, seen)
        return allowed


def type_hints(obj: Any) -> dict[str, Any]:
    """An object's resolved annotations; names that do not resolve are left out."""
    try:
        return typing.get_type_hints(obj)
    except Exception:  # an unresolvable forward reference: take what is not a string
        try:
            raw = inspect.get_annotations(obj)
        except TypeError:
            return {}
        return {k: v for k, v in raw.items() if not isinstance(v, str)}


def _collect(hint: Any, allowed: Allowed, seen: set[int]) -> None:
    if id(hint) in seen:
        return
    seen.add(id(hint))
    for arg in typing.get_args(hint):
        _collect(arg, allowed, seen)
    origin = typing.get_origin(hint)
    if origin is not None:
        _collect(origin, allowed, seen)
        return
    kind = _kind_of(hint) if isinstance(hint, type) else None
    if kind is None:
        return
    allowed.add(hint)
    if kind == "pydantic":
        for info in hint.model_fields.values():
            _collect(info.annotation, allowed, seen)
    elif kind != "enum":
        for field_hint in type_hints(hint).values():
            _collect(field_hint, allowed, seen)


# encoding -----------------------------------------------------------------------------------


class Encoded:
    """A message as the parts to write in order (`transport.writelines`), and its length."""

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: list[Any], nbytes: int) -> None:
        self.parts = parts
        self.nbytes = nbytes

    def tobytes(self) -> bytes:
        """One copy of the whole message (for callers that need `bytes`: tests, small bodies)."""
        return b"".join(self.parts)


def encode(value: Any, *, trusted: bool = False, messages: Iterable[Any] = ()) -> Encoded:
    """Encode `value`. `trusted` lets importable functions and classes cross by name (for
    constructor arguments). `messages` are whole encoded messages (bytes-like) that
    `Message(i)` in `value` refers to: a broadcast's replies, carried without decoding them."""
    buffers: list[memoryview] = [memoryview(m).cast("B") for m in messages]
    skeleton = _Packer(buffers, trusted).pack(value)
    prefix_len = _HEAD.size + _ENTRY.size * len(buffers) + len(skeleton)
    offset = _aligned(prefix_len) if buffers else prefix_len
    entries: list[bytes] = []
    tail: list[Any] = []
    for i, buf in enumerate(buffers):
        entries.append(_ENTRY.pack(offset, buf.nbytes))
        tail.append(buf)
        offset += buf.nbytes
        if i + 1 < len(buffers) and offset % ALIGN:
            pad = _aligned(offset) - offset
            tail.append(_ZEROS[:pad])
            offset += pad
    head = _HEAD.pack(MAGIC, VERSION, 0, len(skeleton), len(buffers))
    first = _ENTRY.unpack(entries[0])[0] if entries else prefix_len
    prefix = b"".join((head, *entries, skeleton, bytes(first - prefix_len)))
    return Encoded([prefix, *tail], offset)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Message:
    """A placeholder for the i-th of `encode(messages=...)`: decoded as that whole message."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class _Packer:
    def __init__(self, buffers: list[memoryview], trusted: bool) -> None:
        self.buffers = buffers
        self.trusted = trusted
        self.depth = 0

    def pack(self, value: Any) -> bytes:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ValueError(f"value nested deeper than {MAX_DEPTH} levels")
        try:
            # A fresh Packer per level (msgpack's is not re-entrant). strict_types: tuples and
            # subclasses of int, str, float reach `default`, so they keep their type.
            packer = msgpack.Packer(default=self.default, use_bin_type=True, strict_types=True)
            return packer.pack(value)
        finally:
            self.depth -= 1

    def buffer(self, view: memoryview) -> int:
        self.buffers.append(view)
        return len(self.buffers) - 1

    def ext(self, code: int, payload: Any) -> msgpack.ExtType:
        return msgpack.ExtType(code, self.pack(payload))

    def default(self, obj: Any) -> Any:
        cls = type(obj)
        if cls is tuple:
            return self.ext(EXT_TUPLE, list(obj))
        module = cls.__module__
        if _is_tensor(obj):
            return self.ext(EXT_ARRAY, _tensor_header(obj, self))
        if module == "numpy":
            return self.ext(EXT_ARRAY, _numpy_header(obj, self))
        if isinstance(obj, Message):
            return msgpack.ExtType(EXT_MESSAGE, self.pack(obj.index))
        if isinstance(obj, enum.Enum):
            return self.ext(EXT_ENUM, [class_key(cls), obj.value])
        if isinstance(obj, bool):
            return bool(obj)
        if isinstance(obj, int):
            if -(2**63) <= obj < 2**64:
                return int(obj)
            return self.ext(EXT_BIGINT, str(int(obj)))
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, str):
            return str(obj)
        if isinstance(obj, bytes | bytearray | memoryview):
            view = memoryview(obj).cast("B")
            if view.nbytes <= INLINE_MAX:
                return bytes(view)
            return self.ext(EXT_BYTES, self.buffer(view))
        if isinstance(obj, complex):
            return self.ext(EXT_COMPLEX, [obj.real, obj.imag])
        if cls is set or cls is frozenset:
            return self.ext(EXT_SET if cls is set else EXT_FROZENSET, list(obj))
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            state = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
            return self.ext(EXT_OBJECT, [OBJ_DATACLASS, class_key(cls), state])
        if isinstance(obj, tuple) and hasattr(cls, "_fields"):
            return self.ext(EXT_OBJECT, [OBJ_NAMEDTUPLE, class_key(cls), list(obj)])
        if _is_pydantic(cls):
            state = {name: getattr(obj, name) for name in cls.model_fields}
            return self.ext(EXT_OBJECT, [OBJ_PYDANTIC, class_key(cls), state])
        if isinstance(obj, list):
            return list(obj)
        if isinstance(obj, dict):
            return dict(obj)
        if isinstance(obj, tuple):
            return self.ext(EXT_TUPLE, list(obj))
        if self.trusted and (inspect.isfunction(obj) or isinstance(obj, type)):
            return msgpack.ExtType(EXT_IMPORT, self.pack(import_path(obj)))
        raise TypeError(_cannot_send(obj, self.trusted))


def _cannot_send(obj: Any, trusted: bool) -> str:
    name = type(obj).__qualname__
    if callable(obj) and not trusted:
        return (
            f"a {name} cannot be sent to an endpoint; functions and classes cross only as "
            "constructor arguments (by import path)"
        )
    return (
        f"values of type {name} cannot be sent: use numpy arrays, torch tensors, bytes, "
        "tuples, lists, dicts, enums, NamedTuples, dataclasses or pydantic models"
    )


def import_path(obj: Any) -> str:
    """`module:qualname` of a module-level function or class, checked to import back to the
    same object; anything else (a lambda, a closure, a method) is refused with the reason."""
    qualname = getattr(obj, "__qualname__", "")
    module = getattr(obj, "__module__", None) or ""
    what = "class" if isinstance(obj, type) else "function"
    if "<lambda>" in qualname:
        raise TypeError(
            "a lambda cannot be a constructor argument: replicas are other processes and "
            "import what they are given; define it with `def` at module level"
        )
    if "<locals>" in qualname:
        raise TypeError(
            f"{what} {qualname} is defined inside a function; replicas import constructor "
            "arguments by name, so define it at module level"
        )
    if module in ("__main__", "__mp_main__"):
        main = sys.modules.get(module)
        path = getattr(main, "__file__", None)
        if not path:
            raise TypeError(
                f"{what} {qualname} is defined in an interactive session; move it into a "
                "module or script file so replicas can import it"
            )
        return f"{path}:{qualname}"
    target: Any = sys.modules.get(module)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    if target is not obj:
        raise TypeError(
            f"{what} {module}.{qualname} does not import back as itself (a decorated or "
            "generated object?); pass a module-level function or class"
        )
    return f"{module}:{qualname}"


def _is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _numpy_header(obj: Any, packer: _Packer) -> list[Any]:
    import numpy as np

    scalar = isinstance(obj, np.generic)
    arr = np.asarray(obj)
    if not isinstance(obj, np.ndarray | np.generic):
        raise TypeError(f"values of type numpy.{type(obj).__name__} cannot be sent")
    if arr.dtype.kind not in "biufc":
        raise TypeError(
            f"numpy arrays of dtype {arr.dtype} cannot be sent (object, string, datetime and "
            "structured arrays have no portable bytes); convert to a numeric dtype"
        )
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr)
    name = arr.dtype.name
    if name not in _DTYPES:
        raise TypeError(f"numpy dtype {name} cannot be sent")
    lib = LIB_NUMPY_SCALAR if scalar else LIB_NUMPY
    return [lib, name, list(arr.shape), _data(memoryview(arr.reshape(-1)).cast("B"), packer), None]


def _tensor_header(obj: Any, packer: _Packer) -> list[Any]:
    import torch

    t = obj.detach()
    if t.layout is not torch.strided:
        raise TypeError(f"tensors with layout {t.layout} cannot be sent; use .to_dense()")
    if t.is_quantized:
        raise TypeError("quantized tensors cannot be sent; send .int_repr() and the scale")
    device = None if t.device.type == "cpu" else str(t.device)
    if device is not None:
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"torch dtype {name} cannot be sent")
    raw = _bytes_of(t.reshape(-1).view(torch.uint8)) if t.numel() else memoryview(b"")
    return [LIB_TORCH, name, list(t.shape), _data(raw, packer), device]


def _bytes_of(flat: Any) -> memoryview:
    """A view of a contiguous CPU uint8 tensor's bytes, without a copy. torch does not need
    numpy, and images with torch often lack it: there the view is made over the tensor's
    memory with ctypes, and the view keeps the tensor alive."""
    try:
        return memoryview(flat.numpy()).cast("B")
    except RuntimeError:  # "Numpy is not available"
        raw = (ctypes.c_ubyte * flat.numel()).from_address(flat.data_ptr())
        raw._owner = flat  # type: ignore[attr-defined]
        return memoryview(raw).cast("B")


def _data(view: memoryview, packer: _Packer) -> int | bytes:
    if view.nbytes <= INLINE_MAX:
        return bytes(view)
    return packer.buffer(view)


# decoding -----------------------------------------------------------------------------------


def is_message(body: Any) -> bool:
    return bytes(body[:3]) == MAGIC


def decode(body: Any, allowed: Allowed | None = None, *, trusted: bool = False) -> Any:
    """The value in `body` (bytes-like). Arrays are views of `body` when it is writable (a
    `bytearray`), else copies. Raises `ValueFormatError` for anything malformed or refused."""
    view = memoryview(body).cast("B")
    return _Unpacker(view, allowed or Allowed(), trusted).value()


class _Unpacker:
    def __init__(self, view: memoryview, allowed: Allowed, trusted: bool) -> None:
        self.view = view
        self.allowed = allowed
        self.trusted = trusted
        self.depth = 0
        total = view.nbytes
        if total < _HEAD.size:
            raise ValueFormatError(f"body of {total} bytes is shorter than a message head")
        magic, version, _flags, skeleton, count = _HEAD.unpack_from(view)
        if magic != MAGIC:
            raise ValueFormatError("not a kubeforge message (bad magic)")
        if version != VERSION:
            raise ValueFormatError(f"message version {version}; this receiver reads {VERSION}")
        table_end = _HEAD.size + _ENTRY.size * count
        if count > total or table_end + skeleton > total:
            raise ValueFormatError(
                f"head says {skeleton} skeleton bytes and {count} buffers; the body has "
                f"{total} bytes (truncated?)"
            )
        self.skeleton = view[table_end : table_end + skeleton]
        self.buffers: list[tuple[int, int]] = []
        for i in range(count):
            offset, length = _ENTRY.unpack_from(view, _HEAD.size + _ENTRY.size * i)
            if offset < table_end + skeleton or offset + length > total:
                raise ValueFormatError(
                    f"buffer {i} at {offset}+{length} is outside the body of {total} bytes "
                    "(truncated?)"
                )
            self.buffers.append((offset, length))

    def value(self) -> Any:
        return self.unpack(self.skeleton)

    def unpack(self, data: Any) -> Any:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ValueFormatError(f"value nested deeper than {MAX_DEPTH} levels")
        try:
            return msgpack.unpackb(
                data, ext_hook=self.ext, raw=False, strict_map_key=False, use_list=True
            )
        except _MSGPACK_ERRORS as exc:
            raise _malformed(exc, "message") from None
        finally:
            self.depth -= 1

    def buffer(self, index: Any) -> memoryview:
        if not isinstance(index, int) or not 0 <= index < len(self.buffers):
            raise ValueFormatError(
                f"reference to buffer {index!r}; the message has {len(self.buffers)}"
            )
        offset, length = self.buffers[index]
        return self.view[offset : offset + length]

    def ext(self, code: int, data: bytes) -> Any:
        if code == EXT_ARRAY:
            return self.array(self.unpack(data))
        if code == EXT_TUPLE:
            return tuple(self.list_of(self.unpack(data), "tuple"))
        if code == EXT_OBJECT:
            return self.object(data)
        if code == EXT_ENUM:
            key, value = self.pair(self.unpack(data), "enum")
            cls = self.cls(key, "enum")
            try:
                return cls(value)
            except ValueError as exc:
                raise ValueFormatError(str(exc)) from None
        if code == EXT_SET:
            return set(self.hashable(self.unpack(data), "set"))
        if code == EXT_FROZENSET:
            return frozenset(self.hashable(self.unpack(data), "frozenset"))
        if code == EXT_COMPLEX:
            real, imag = self.pair(self.unpack(data), "complex")
            return complex(real, imag)
        if code == EXT_BIGINT:
            text = self.unpack(data)
            if not isinstance(text, str) or len(text) > 4300:
                raise ValueFormatError("malformed big integer")
            return int(text)
        if code == EXT_BYTES:
            return bytes(self.buffer(self.unpack(data)))
        if code == EXT_MESSAGE:
            inner = self.buffer(self.unpack(data))
            nested = _Unpacker(inner, self.allowed, self.trusted)
            nested.depth = self.depth
            return nested.value()
        if code == EXT_IMPORT:
            return self.imported(self.unpack(data))
        raise ValueFormatError(f"unknown extension type {code}")

    def list_of(self, value: Any, what: str) -> list[Any]:
        if not isinstance(value, list):
            raise ValueFormatError(f"malformed {what}")
        return value

    def pair(self, value: Any, what: str) -> list[Any]:
        if not isinstance(value, list) or len(value) != 2:
            raise ValueFormatError(f"malformed {what}")
        return value

    def hashable(self, value: Any, what: str) -> list[Any]:
        items = self.list_of(value, what)
        try:
            for item in items:
                hash(item)
        except TypeError:
            raise ValueFormatError(f"a {what} holds an unhashable value") from None
        return items

    def cls(self, key: Any, kind: str) -> type:
        if not isinstance(key, str):
            raise ValueFormatError(f"malformed {kind} class name")
        cls = self.allowed.get(key)
        if cls is None and self.trusted:
            cls = _import(key)
        if cls is None:
            raise ValueFormatError(
                f"class {key} is not allowed here: a receiver rebuilds only the classes in "
                "its endpoints' type hints, the handle's actor class, or "
                "kubeforge.register_type()"
            )
        return cls

    def object(self, data: bytes) -> Any:
        """[kind, class key, state]: the class is looked up before its state is decoded, so a
        refusal names the outermost class and costs nothing more."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ValueFormatError(f"value nested deeper than {MAX_DEPTH} levels")
        try:
            reader = msgpack.Unpacker(
                None,
                ext_hook=self.ext,
                raw=False,
                strict_map_key=False,
                max_buffer_size=max(len(data), 1),
            )
            reader.feed(data)
            if reader.read_array_header() != 3:
                raise ValueFormatError("malformed object")
            kind, key = reader.unpack(), reader.unpack()
            cls = self.cls(key, "object")
            state = reader.unpack()
        except _MSGPACK_ERRORS as exc:
            raise _malformed(exc, "object") from None
        finally:
            self.depth -= 1
        expected = {
            OBJ_DATACLASS: "dataclass",
            OBJ_PYDANTIC: "pydantic",
            OBJ_NAMEDTUPLE: "namedtuple",
        }.get(kind)
        if expected is None or _kind_of(cls) != expected:
            raise ValueFormatError(f"{key} is not a {expected or 'known kind of object'}")
        if kind == OBJ_NAMEDTUPLE:
            fields = self.list_of(state, "NamedTuple")
            if len(fields) != len(cls._fields):
                raise ValueFormatError(f"{key} has {len(cls._fields)} fields, not {len(fields)}")
            return cls._make(fields)
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ValueFormatError(f"malformed fields of {key}")
        if kind == OBJ_PYDANTIC:
            try:
                return cls.model_validate(state)
            except ValueError as exc:
                raise ValueFormatError(f"{key}: {exc}") from None
        names = {f.name for f in dataclasses.fields(cls)}
        if set(state) != names:
            raise ValueFormatError(
                f"{key} has fields {sorted(names)}; the message gives {sorted(state)}"
            )
        # As pickle does: the object's state, not a second run of __init__/__post_init__.
        obj = cls.__new__(cls)
        for name, field_value in state.items():
            object.__setattr__(obj, name, field_value)
        return obj

    def imported(self, path: Any) -> Any:
        if not self.trusted:
            raise ValueFormatError(
                "functions and classes cross only as constructor arguments, not in calls"
            )
        if not isinstance(path, str):
            raise ValueFormatError("malformed import path")
        obj = _import(path)
        if obj is None:
            raise ValueFormatError(f"cannot import {path}")
        return obj

    def array(self, header: Any) -> Any:
        if not isinstance(header, list) or len(header) != 5:
            raise ValueFormatError("malformed array header")
        lib, dtype, shape, src, _device = header
        if dtype not in _DTYPES:
            raise ValueFormatError(f"unknown dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and d >= 0 for d in shape)
        ):
            raise ValueFormatError(f"malformed shape {shape!r}")
        itemsize, numpy_name = _DTYPES[dtype]
        count = 1
        for d in shape:
            count *= d
        data = src if isinstance(src, bytes) else self.buffer(src)
        if count * itemsize != len(data):
            raise ValueFormatError(
                f"array of dtype {dtype} and shape {tuple(shape)} needs {count * itemsize} "
                f"bytes; the message gives {len(data)}"
            )
        writable = isinstance(data, memoryview) and not data.readonly
        if lib == LIB_TORCH:
            return _to_tensor(data, dtype, shape, writable)
        if lib not in (LIB_NUMPY, LIB_NUMPY_SCALAR) or numpy_name is None:
            raise ValueFormatError(f"malformed array header (library {lib!r}, dtype {dtype})")
        import numpy as np

        arr = np.frombuffer(data, dtype=numpy_name).reshape(shape)
        if lib == LIB_NUMPY_SCALAR:
            return arr[()] if arr.ndim == 0 else arr.reshape(-1)[0]
        return arr if writable else arr.copy()


_MSGPACK_ERRORS = (ValueError, TypeError, msgpack.UnpackException, msgpack.OutOfData)


def _malformed(exc: BaseException, what: str) -> ValueFormatError:
    """A refusal raised deeper keeps its own message; msgpack's errors say what was malformed."""
    if isinstance(exc, ValueFormatError):
        return exc
    return ValueFormatError(f"malformed {what}: {exc}")


def _to_tensor(data: Any, dtype: str, shape: list[int], writable: bool) -> Any:
    try:
        import torch
    except ImportError:
        raise ValueFormatError(
            "the message holds a torch tensor and torch is not installed here"
        ) from None
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueFormatError(f"this torch has no dtype {dtype}")
    if not len(data):
        return torch.empty(shape, dtype=torch_dtype)
    if not writable:
        data = bytearray(data)
    return torch.frombuffer(data, dtype=torch.uint8).view(torch_dtype).reshape(shape)


def _import(path: str) -> Any:
    """`module:qualname` or `/path/script.py:qualname` (constructor arguments only)."""
    module_name, sep, qualname = path.rpartition(":")
    if not sep:
        return None
    if module_name.endswith(".py"):
        module: Any = sys.modules.get("__mp_main__")
        if module is None or getattr(module, "__file__", None) != module_name:
            from kubeforge.actor import _load_script

            module = _load_script(module_name)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def to_device(value: Any, device: str) -> Any:
    """`value` with every torch tensor in it (through lists, tuples, dicts and dataclasses)
    moved to `device`: what `@endpoint(device=...)` does to a call's arguments."""
    if _is_tensor(value):
        return value.to(device)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if type(value) is tuple:
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            object.__setattr__(value, f.name, to_device(getattr(value, f.name), device))
    return value


def resolve_imports(value: Any) -> Any:
    """JSON constructor arguments (a manifest's `args`/`kwargs`) with every `{"$import":
    "module:name"}` replaced by what it names: how a manifest passes a function or a class."""
    if isinstance(value, list):
        return [resolve_imports(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"$import"}:
            path = value["$import"]
            obj = _import(path) if isinstance(path, str) else None
            if obj is None:
                raise ValueError(f"cannot import {path!r} (named by $import)")
            return obj
        return {k: resolve_imports(v) for k, v in value.items()}
    return value


def describe_types() -> types.MappingProxyType[str, tuple[int, str | None]]:
    """The dtypes that cross, with their sizes (docs and tests read it)."""
    return types.MappingProxyType(_DTYPES)
