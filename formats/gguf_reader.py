"""GGUF v3 reader: memory-mapped, zero-copy tensor views, every count and offset checked before it is used.

Layout (ggml docs/gguf.md): header (magic, version, tensor count, kv count), metadata key/values, tensor infos
(name, dims in ggml order, type, offset relative to the data section), padding to the alignment, tensor data.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qtool.errors import QtoolError
from qtool.formats.constants import (GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, TYPE_INFO, VALUE_DTYPES, GGMLType, Keys,
                                     ValueType)

MAX_DIMS = 4
MAX_NESTING = 8  # arrays of arrays deeper than this are not real files
# ggml's gguf_init_from_file reads ne[] as int64 and rejects negative dims and element counts past INT64_MAX;
# a dim of 0 it accepts (an empty tensor), so we do too, with correctly shaped empty views
MAX_ELEMENTS = 2**63 - 1


def _prod(ne: list[int]) -> int:
    n = 1
    for d in ne:
        n *= d
    return n


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: last axis is the row (ggml ne[0])
    ggml_type: GGMLType
    offset: int  # absolute offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class MetaField:
    value: Any  # int, float, bool, str, numpy array (numeric arrays), or list (string / nested arrays)
    type: ValueType
    elem_type: ValueType | None = None  # for arrays
    items: tuple["MetaField", ...] | None = None  # for arrays of arrays: each inner array with its own elem_type

    def writer_value(self) -> Any:
        """The value in the form GGUFWriter.add takes: for arrays of arrays, [(elem_type, values), ...] nested
        (the inner element types are not recoverable from the plain values, e.g. for empty inner arrays)."""
        if self.items is None:
            return self.value
        return [(it.elem_type, it.writer_value()) for it in self.items]


class GGUFFile:
    """An open GGUF file. Tensor data is accessed through numpy views of a read-only memory map."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise QtoolError(f"{self.path}: cannot open: {e.strerror}") from None
        size = os.fstat(self._fh.fileno()).st_size
        if size == 0:
            self._fh.close()
            raise QtoolError(f"{self.path}: empty file, not a GGUF file")
        self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = memoryview(self._map)
        self.size = size
        self._pos = 0
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # ---- low-level reads, each bounds-checked -------------------------------------------------------------
    def _fail(self, problem: str) -> QtoolError:
        return QtoolError(f"{self.path}: {problem}")

    def _take(self, n: int, what: str) -> int:
        if n < 0 or self._pos + n > self.size:
            raise self._fail(f"truncated: {what} at byte {self._pos} needs {n} bytes, file has {self.size}")
        start = self._pos
        self._pos += n
        return start

    def _scalar(self, fmt: str, what: str):
        start = self._take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self._buf, start)[0]

    def _u32(self, what: str) -> int:
        return self._scalar("<I", what)

    def _u64(self, what: str) -> int:
        return self._scalar("<Q", what)

    def _string(self, what: str) -> str:
        n = self._u64(f"{what} length")
        start = self._take(n, what)
        try:
            return bytes(self._buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self._fail(f"{what} at byte {start} is not valid UTF-8") from None

    def _strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row: _string's checks, in one loop (a tokenizer's vocabulary took 0.3 s of a
        135M model's load through _string)."""
        buf, pos, size, out = self._buf, self._pos, self.size, []
        length = struct.Struct("<Q").unpack_from
        for i in range(count):
            if pos + 8 > size:
                raise self._fail(f"truncated: {what}[{i}] length at byte {pos} needs 8 bytes, file has {size}")
            n = length(buf, pos)[0]
            pos += 8
            if n > size - pos:
                raise self._fail(f"truncated: {what}[{i}] at byte {pos} needs {n} bytes, file has {size}")
            try:
                out.append(str(buf[pos:pos + n], "utf-8"))
            except UnicodeDecodeError:
                raise self._fail(f"{what}[{i}] at byte {pos} is not valid UTF-8") from None
            pos += n
        self._pos = pos
        return out

    def _value_type(self, what: str) -> ValueType:
        raw = self._u32(what)
        try:
            return ValueType(raw)
        except ValueError:
            raise self._fail(f"unknown metadata value type {raw} for {what}") from None

    def _value(self, vtype: ValueType, what: str, depth: int = 0) -> MetaField:
        if vtype == ValueType.STRING:
            return MetaField(self._string(what), vtype)
        if vtype == ValueType.ARRAY:
            if depth >= MAX_NESTING:
                raise self._fail(f"{what}: arrays nested more than {MAX_NESTING} deep")
            etype = self._value_type(f"{what} element type")
            count = self._u64(f"{what} element count")
            remaining = self.size - self._pos
            min_size = 8 if etype in (ValueType.STRING, ValueType.ARRAY) else np.dtype(VALUE_DTYPES[etype]).itemsize
            if count * min_size > remaining:
                raise self._fail(f"truncated: {what} claims {count} elements, more than the file holds")
            if etype in VALUE_DTYPES:
                dtype = np.dtype(VALUE_DTYPES[etype])
                start = self._take(count * dtype.itemsize, what)
                arr = np.frombuffer(self._buf, dtype=dtype, count=count, offset=start).copy()
                if etype == ValueType.BOOL:
                    arr = arr.astype(bool)
                return MetaField(arr, vtype, etype)
            if etype == ValueType.STRING:  # vocabularies: 50k-250k strings, read without a call each
                return MetaField(self._strings(count, what), vtype, etype)
            fields = [self._value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]
            return MetaField([f.value for f in fields], vtype, etype,
                             tuple(fields) if etype == ValueType.ARRAY else None)
        dtype = np.dtype(VALUE_DTYPES[vtype])
        start = self._take(dtype.itemsize, what)
        v = np.frombuffer(self._buf, dtype=dtype, count=1, offset=start)[0]
        if vtype == ValueType.BOOL:
            return MetaField(bool(v), vtype)
        return MetaField(v.item(), vtype)

    # ---- structure ---------------------------------------------------------------------------------------
    def _parse(self) -> None:
        if self.size < 4 or self._u32("magic") != GGUF_MAGIC:
            raise self._fail("not a GGUF file (bad magic)")
        self.version = self._u32("version")
        if self.version not in (2, 3):
            raise self._fail(f"unsupported GGUF version {self.version} (supported: 2, 3)")
        n_tensors = self._u64("tensor count")
        n_kv = self._u64("metadata count")
        # each kv needs at least 12 bytes and each tensor info at least 24: reject absurd counts up front
        if n_kv * 12 + n_tensors * 24 > self.size - self._pos:
            raise self._fail(f"truncated: header claims {n_kv} metadata entries and {n_tensors} tensors")

        self.fields: dict[str, MetaField] = {}
        for i in range(n_kv):
            key = self._string(f"metadata key #{i}")
            if key in self.fields:
                raise self._fail(f"duplicate metadata key {key!r}")
            vtype = self._value_type(f"metadata {key!r} type")
            self.fields[key] = self._value(vtype, f"metadata {key!r}")

        self.alignment = GGUF_DEFAULT_ALIGNMENT
        if Keys.General.ALIGNMENT in self.fields:
            align = self.fields[Keys.General.ALIGNMENT].value
            if not isinstance(align, int) or align <= 0 or align % 8:
                raise self._fail(f"general.alignment {align!r} is not a positive multiple of 8")
            self.alignment = align

        infos = []
        for i in range(n_tensors):
            name = self._string(f"tensor #{i} name")
            n_dims = self._u32(f"tensor {name!r} dimension count")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self._fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            ne = [self._u64(f"tensor {name!r} dimension") for _ in range(n_dims)]
            # checked here, before anything is shaped or allocated from them (numpy cannot even shape 2^63)
            if any(d > MAX_ELEMENTS for d in ne):
                raise self._fail(f"tensor {name!r} has dimensions {ne}: a dimension above 2^63-1 is invalid")
            if 0 not in ne and _prod(ne) > MAX_ELEMENTS:
                raise self._fail(f"tensor {name!r} has dimensions {ne}: more than 2^63-1 elements")
            raw_type = self._u32(f"tensor {name!r} type")
            try:
                ggml_type = GGMLType(raw_type)
                info = TYPE_INFO[ggml_type]
            except (ValueError, KeyError):
                raise self._fail(f"tensor {name!r} has unknown type {raw_type}") from None
            rel = self._u64(f"tensor {name!r} offset")
            infos.append((name, ne, ggml_type, info, rel))

        self.data_offset = -(-self._pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, ggml_type, info, rel in infos:
            if name in self.tensors:
                raise self._fail(f"duplicate tensor name {name!r}")
            n = 1
            for d in ne:
                n *= d
            if ne[0] // info.block_size * info.type_size > MAX_ELEMENTS:  # a row numpy could not shape, even empty
                raise self._fail(f"tensor {name!r}: a row of {ne[0]} {ggml_type.name} values is too long")
            if ne[0] % info.block_size:
                raise self._fail(f"tensor {name!r}: row of {ne[0]} is not a multiple of "
                                 f"{ggml_type.name}'s block of {info.block_size}")
            nbytes = n // info.block_size * info.type_size
            start = self.data_offset + rel
            if rel % self.alignment:
                raise self._fail(f"tensor {name!r} offset {rel} is not aligned to {self.alignment}")
            if start + nbytes > self.size:
                raise self._fail(f"truncated: tensor {name!r} needs bytes {start}..{start + nbytes}, "
                                 f"file has {self.size}")
            self.tensors[name] = TensorInfo(name, tuple(reversed(ne)), ggml_type, start, nbytes)

    # ---- public API -------------------------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        return {k: f.value for k, f in self.fields.items()}

    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else f.value

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a zero-copy uint8 view, shaped (rows, bytes per row)."""
        t = self.tensors[name]
        row = t.shape[-1] // TYPE_INFO[t.ggml_type].block_size * TYPE_INFO[t.ggml_type].type_size
        rows = _prod(list(t.shape[:-1]))
        if t.nbytes == 0:  # an empty tensor (a zero dim): reshape(-1, 0) is ambiguous, and frombuffer needs a byte
            return np.zeros((rows, row), dtype=np.uint8)
        arr = np.frombuffer(self._map, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return arr.reshape(rows, row)

    def array(self, name: str) -> np.ndarray:
        """Zero-copy typed view for float/int tensors in numpy shape; packed uint8 rows for quantized ones.

        BF16 comes back as uint16 (numpy has no bfloat16)."""
        t = self.tensors[name]
        dtypes = {GGMLType.F32: "<f4", GGMLType.F16: "<f2", GGMLType.BF16: "<u2", GGMLType.F64: "<f8",
                  GGMLType.I8: "i1", GGMLType.I16: "<i2", GGMLType.I32: "<i4", GGMLType.I64: "<i8"}
        if t.ggml_type not in dtypes:
            return self.raw(name)
        if t.nbytes == 0:  # an empty tensor: frombuffer cannot take count=0 at the end of the map
            return np.zeros(t.shape, dtype=dtypes[t.ggml_type])
        return np.frombuffer(self._map, dtype=dtypes[t.ggml_type], count=t.n_elements,
                             offset=t.offset).reshape(t.shape)

    def release(self, name: str) -> None:
        """Drop a tensor's pages from this process's resident set once it has been used."""
        t = self.tensors[name]
        start = t.offset - t.offset % mmap.PAGESIZE
        if hasattr(self._map, "madvise") and t.nbytes:
            self._map.madvise(mmap.MADV_DONTNEED, start, t.offset + t.nbytes - start)

    def close(self) -> None:
        # numpy views keep the buffer exported; the map is freed when the last view goes away
        if getattr(self, "_buf", None) is not None:
            self._buf.release()
            self._buf = None
        try:
            self._map.close()
        except (BufferError, AttributeError):
            pass
        self._fh.close()

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
