"""Safetensors reader: one memory map per file, tensors viewed lazily one at a time and released after use.

Format: uint64 header length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__"},
then the data section. Offsets are checked against the file before any view is made.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qtool.errors import QtoolError

# safetensors dtype → numpy dtype of the stored bits (BF16 is kept as raw uint16)
DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U8": "u1", "BOOL": "u1"}
MAX_HEADER = 100 * 1024 * 1024
MAX_DIMS = 8  # GGUF holds 4; a few more leave the error to the architecture's shape check, which names the tensor
MAX_JSON_BYTES = 512 << 20  # the largest tokenizer.json on the hub is ~35 MB: anything past this is not a checkpoint
MAX_JSON_DEPTH = 100  # real configs and tokenizers nest < 10 deep; the bound keeps every later walk off the C stack


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of `path`, refused unless it is a regular file. O_NONBLOCK makes opening a FIFO
    return at once instead of waiting for a writer forever; the check is on the opened file, so a swap between
    stat and open cannot slip a device in."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise QtoolError(f"{path}: cannot open: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise QtoolError(f"{path}: is {kind}; qtool reads only regular files")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def parse_json(data: str | bytes, where: str | os.PathLike) -> Any:
    """json.loads bounded in nesting: a document nested 100,000 deep is an error naming the file, never a
    RecursionError (here or in any later walk of the result)."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise QtoolError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as e:  # ValueError also covers an integer of more than 4300 digits
        raise QtoolError(f"{where}: not valid JSON: {str(e).splitlines()[0]}") from None
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:  # iterative: the point is not to recurse
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise QtoolError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        children = v.values() if isinstance(v, dict) else v
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return value


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file of a checkpoint, read only if it is a regular file of bounded size."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise QtoolError(f"{path}: {size} bytes, more than the {max_bytes} a JSON file of a checkpoint may have")
        data = fh.read(max_bytes + 1)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QtoolError(f"{path}: not valid JSON: not UTF-8 ({e.reason} at byte {e.start})") from None
    return parse_json(text, path)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
        self._fh = os.fdopen(open_regular(self.path), "rb")
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
        header = parse_json(self._fh.read(n), f"{self.path}: safetensors header")
        if not isinstance(header, dict):
            raise self._fail("corrupt safetensors header: not a JSON object")
        meta = header.get("__metadata__", {})
        if not isinstance(meta, dict):
            raise self._fail("corrupt safetensors header: __metadata__ is not an object")
        base = 8 + n
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            out[name] = self._entry(name, entry, base)
        # the format forbids shared bytes: an overlap is a crafted or corrupt file, whatever its tensors' values
        spans = sorted((t.begin, t.end, t.name) for t in out.values() if t.end > t.begin)
        for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
            if begin < end:
                raise self._fail(f"tensors {a!r} and {b!r} overlap in the data section")
        return out

    def _entry(self, name: str, entry: Any, base: int) -> StoredTensor:
        """One header entry, every field checked for type and range before any arithmetic on it."""
        if not isinstance(entry, dict):
            raise self._fail(f"header entry for {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self._fail(f"tensor {name!r} has unsupported dtype {str(dtype)[:40]}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
            raise self._fail(f"tensor {name!r}: shape {str(shape)[:60]} is not a list of at most {MAX_DIMS} "
                             "non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise self._fail(f"tensor {name!r}: data_offsets {str(offsets)[:60]} is not two integers")
        begin, end = offsets
        # Python integers: the product cannot overflow, and it is compared with the file before numpy sees it
        need = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        if not 0 <= begin <= end or end - begin != need:
            raise self._fail(f"tensor {name!r}: offsets {begin}..{end} do not fit shape {shape} {dtype}")
        if base + end > self.size:
            raise self._fail(f"truncated: tensor {name!r} ends at byte {base + end}, file has {self.size}")
        return StoredTensor(name, dtype, tuple(shape), base + begin, base + end)

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
