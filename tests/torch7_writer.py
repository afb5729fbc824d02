"""A small Torch7 binary serializer, written from torch7's File.lua / Tensor.c / Storage.c format,
so tests can make `.t7` files without Lua.

Every value is written with a type tag (nil 0, number 1, string 2, table 3, torch object 4,
boolean 5). Tables and torch objects carry a reference index: an object written twice is
written once and referenced after, which is how Torch files share modules and storages.
A torch object is its version string ("V 1") and class name, then either its own payload
(tensors: dimensions, sizes, strides, 1-based storage offset, storage; storages: length, raw
elements) or the table of its fields. Longs are 8 bytes, as Torch7 writes them on Linux.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NIL, NUMBER, STRING, TABLE, TORCH, BOOLEAN = range(6)

_ELEMENT_TYPES = {
    "torch.FloatStorage": np.float32,
    "torch.CudaStorage": np.float32,
    "torch.DoubleStorage": np.float64,
    "torch.LongStorage": np.int64,
}


@dataclass(eq=False)
class Storage:
    """A torch storage: a flat array of one element type."""

    typename: str
    data: np.ndarray


@dataclass(eq=False)
class Tensor:
    """A torch tensor: a strided view into a storage (offset 0-based here, 1-based on disk)."""

    typename: str
    storage: Storage | None
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def numpy(self) -> np.ndarray:
        """The values this tensor shows, read from its storage by offset and strides."""
        if self.storage is None or not self.size:
            return np.zeros((0,), np.float32)
        index = np.full(self.size, self.offset)
        for d, (n, s) in enumerate(zip(self.size, self.stride)):
            shape = [1] * len(self.size)
            shape[d] = n
            index = index + (np.arange(n) * s).reshape(shape)
        return self.storage.data[index]


@dataclass(eq=False)
class Object:
    """An instance of a torch class whose fields are serialized as a table."""

    typename: str
    fields: dict[str, Any] = field(default_factory=dict)
    version: int = 1


def storage_type(tensor_type: str) -> str:
    return tensor_type.replace("Tensor", "Storage")


def tensor(values, typename: str = "torch.CudaTensor") -> Tensor:
    """A contiguous tensor with a storage of its own."""
    values = np.asarray(values)
    stype = storage_type(typename)
    data = values.astype(_ELEMENT_TYPES[stype]).reshape(-1)
    strides = tuple(int(np.prod(values.shape[d + 1 :])) for d in range(values.ndim))
    return Tensor(typename, Storage(stype, data) if values.size else None, 0, values.shape, strides)


def long_storage(values) -> Storage:
    return Storage("torch.LongStorage", np.asarray(values, np.int64).reshape(-1))


class _Writer:
    def __init__(self):
        self.chunks: list[bytes] = []
        self.indices: dict[int, int] = {}
        self.keep: list[Any] = []  # holds objects so their ids stay unique while writing

    def raw(self, fmt: str, *values) -> None:
        self.chunks.append(struct.pack("<" + fmt, *values))

    def string(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        self.raw("i", len(data))
        self.chunks.append(data)

    def reference(self, tag: int, obj: Any) -> bool:
        """Writes tag and index; True when the object still needs its content written."""
        self.raw("i", tag)
        known = id(obj) in self.indices
        if not known:
            self.indices[id(obj)] = len(self.indices) + 1
            self.keep.append(obj)
        self.raw("i", self.indices[id(obj)])
        return not known

    def value(self, obj: Any) -> None:
        if obj is None:
            self.raw("i", NIL)
        elif isinstance(obj, bool):
            self.raw("i", BOOLEAN)
            self.raw("i", int(obj))
        elif isinstance(obj, (int, float, np.integer, np.floating)):
            self.raw("i", NUMBER)
            self.raw("d", float(obj))
        elif isinstance(obj, (str, bytes)):
            self.raw("i", STRING)
            self.string(obj)
        elif isinstance(obj, (dict, list)):
            if self.reference(TABLE, obj):
                items = obj.items() if isinstance(obj, dict) else enumerate(obj, start=1)
                items = list(items)
                self.raw("i", len(items))
                for key, val in items:
                    self.value(key)
                    self.value(val)
        elif isinstance(obj, (Object, Tensor, Storage)):
            if self.reference(TORCH, obj):
                self.string(f"V {obj.version if isinstance(obj, Object) else 1}")
                self.string(obj.typename)
                self.payload(obj)
        else:
            raise TypeError(f"cannot serialize {type(obj).__name__}")

    def payload(self, obj: Object | Tensor | Storage) -> None:
        if isinstance(obj, Storage):
            self.raw("q", obj.data.size)
            self.chunks.append(np.ascontiguousarray(obj.data, _ELEMENT_TYPES[obj.typename]).tobytes())
        elif isinstance(obj, Tensor):
            self.raw("i", len(obj.size))
            self.raw(f"{len(obj.size)}q", *obj.size)
            self.raw(f"{len(obj.stride)}q", *obj.stride)
            self.raw("q", obj.offset + 1)
            self.value(obj.storage)
        else:
            self.value(dict(obj.fields))  # Torch writes a fresh table of the fields


def dumps(obj: Any) -> bytes:
    """The Torch7 binary serialization of `obj` (None, bool, numbers, strings, dict/list tables,
    `Object`, `Tensor`, `Storage`)."""
    writer = _Writer()
    writer.value(obj)
    return b"".join(writer.chunks)


def save(path, obj: Any) -> None:
    with open(path, "wb") as f:
        f.write(dumps(obj))
