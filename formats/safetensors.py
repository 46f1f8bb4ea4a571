"""Safetensors reader: one memory map per file, tensors viewed lazily one at a time and released after use.

Format: uint64 header length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__"},
then the data section. Offsets are checked against the file before any view is made.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qtool.errors import QtoolError

# safetensors dtype → numpy dtype of the stored bits (BF16 is kept as raw uint16)
DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U8": "u1", "BOOL": "u1"}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise QtoolError(f"{self.path}: cannot open: {e.strerror}") from None
        self.size = os.fstat(self._fh.fileno()).st_size
        try:
            self.tensors = self._parse_header()
            self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        except BaseException:
            self._fh.close()
            raise

    def _fail(self, problem: str) -> QtoolError:
        return QtoolError(f"{self.path}: {problem}")

    def _parse_header(self) -> dict[str, StoredTensor]:
        head = self._fh.read(8)
        if len(head) < 8:
            raise self._fail("truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > self.size:
            raise self._fail(f"truncated or corrupt safetensors file (header of {n} bytes, file of {self.size})")
        try:
            header = json.loads(self._fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise self._fail("corrupt safetensors header: not a JSON object")
        base = 8 + n
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._fail(f"corrupt safetensors header entry for {name!r}") from None
            if dtype not in DTYPES:
                raise self._fail(f"tensor {name!r} has unsupported dtype {dtype}")
            need = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
            if not (0 <= begin <= end) or end - begin != need or any(d < 0 for d in shape):
                raise self._fail(f"tensor {name!r}: offsets {begin}..{end} do not fit shape {list(shape)} {dtype}")
            if base + end > self.size:
                raise self._fail(f"truncated: tensor {name!r} ends at byte {base + end}, file has {self.size}")
            out[name] = StoredTensor(name, dtype, shape, base + begin, base + end)
        return out

    def view(self, name: str) -> np.ndarray:
        """Zero-copy view of the stored values (BF16 as uint16)."""
        t = self.tensors[name]
        count = int(np.prod(t.shape, dtype=np.int64))
        if count == 0:
            return np.zeros(t.shape, dtype=DTYPES[t.dtype])
        return np.frombuffer(self._map, dtype=DTYPES[t.dtype], count=count, offset=t.begin).reshape(t.shape)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident set once it has been used."""
        t = self.tensors[name]
        start = t.begin - t.begin % mmap.PAGESIZE
        if hasattr(self._map, "madvise") and t.end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, t.end - start)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a caller still holds a view; the map goes when it does
        self._fh.close()
