"""GGUF v3 writer that streams: metadata and every tensor's type and shape are declared first, then tensor
data is written one tensor at a time, so peak memory is one tensor, never the model.

Output goes to a hidden temporary file beside the destination and is renamed over it only when complete:
an error or Ctrl-C leaves no partial file and an existing file untouched. The temporary file's name carries the
writer's pid, so one left by a killed run (kill -9) is recognized and removed by the next writer in that folder.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qtool.errors import QtoolError
from qtool.formats.constants import (GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, VALUE_DTYPES, GGMLType, Keys,
                                     ValueType, tensor_nbytes)


# our temporary files: ".<output name>.<pid>.<mkstemp's 8 characters>.partial" (older runs wrote no pid)
PARTIAL = re.compile(r"^\..+?(?:\.(?P<pid>\d+))?\.[A-Za-z0-9_]{8}\.partial$")
STALE_SECONDS = 3600  # a live writer touches its file far more often than this, even on one huge tensor
DEAD_GRACE_SECONDS = 60  # a dead pid is trusted only past this: another pid namespace may share the folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or not a pid we can ask about: leave its file alone
    return True


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Remove our temporary files left in `folder` by a killed run (kill -9, power loss): those whose writer no
    longer exists, or untouched for an hour. Returns the removed paths, for the caller to report."""
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = PARTIAL.match(entry.name)
        if not m:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not entry.is_file(follow_symlinks=False):
                continue
            age = now - st.st_mtime
            pid = int(m.group("pid")) if m.group("pid") else None
            dead = pid is not None and pid != os.getpid() and not _alive(pid) and age > DEAD_GRACE_SECONDS
            if dead or age > STALE_SECONDS:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # gone already, or not ours to remove
    return removed


def output_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be an output file (checked before any work), or None. An empty name is "." here: the
    CLI's Path conversion turns "" into it."""
    path = Path(path)
    if not str(path) or not path.name or path.is_dir():
        return f"{str(path) or repr('')} is a directory; give the output file's name"
    return None


@contextlib.contextmanager
def _signals_held():
    """Hold Ctrl-C and SIGTERM off while a temporary file is created or removed, so an interrupt cannot fall
    between creating it and remembering it, or in the middle of removing it: it is re-raised right after. The
    Python handlers are swapped rather than the signal mask, since numba's threads would still take the signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            if handler is not None:  # None: a handler set outside Python, which cannot be put back from here
                signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    ggml_type: GGMLType
    offset: int  # relative to the data section
    nbytes: int


def _pad(n: int, alignment: int) -> int:
    return -n % alignment


def _encode_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _encode_value(value: Any, vtype: ValueType, elem_type: ValueType | None) -> bytes:
    if vtype == ValueType.STRING:
        return _encode_string(value)
    if vtype == ValueType.ARRAY:
        if elem_type is None:
            raise ValueError("array metadata needs an element type")
        if elem_type == ValueType.ARRAY:  # _encode_nested writes its own header
            return _encode_nested(value)
        head = struct.pack("<IQ", elem_type, len(value))
        if elem_type in VALUE_DTYPES:
            return head + np.asarray(value).astype(VALUE_DTYPES[elem_type], copy=False).tobytes()
        if elem_type == ValueType.STRING:
            return head + b"".join(_encode_string(s) for s in value)
        raise ValueError(f"arrays of {ValueType(elem_type).name} cannot be written")
    if vtype == ValueType.BOOL:
        return struct.pack("<B", 1 if value else 0)
    return np.array(value, dtype=VALUE_DTYPES[vtype]).tobytes()


def _encode_nested(items: Sequence[tuple[ValueType, Sequence]]) -> bytes:
    """An array whose elements are arrays: each item is (element type, values), and values of an ARRAY element
    type are again [(element type, values), ...] (GGUF allows any depth; MetaField.writer_value gives this form)."""
    out = [struct.pack("<IQ", ValueType.ARRAY, len(items))]
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError("nested arrays are written as (ValueType.ARRAY, [(elem_type, items), ...])")
        etype, values = item
        if etype is None:
            raise ValueError("an inner array needs an element type")
        out.append(_encode_value(values, ValueType.ARRAY, etype))
    return b"".join(out)


class GGUFWriter:
    """Declare metadata with add(), tensors with add_tensor(), then write_tensor() each in order, then close().

    Use as a context manager: leaving the block with an exception (Ctrl-C included) removes the temporary file.
    """

    def __init__(self, path: str | os.PathLike, alignment: int = GGUF_DEFAULT_ALIGNMENT):
        self.path = Path(path)
        self.alignment = alignment
        self._kv: dict[str, bytes] = {}
        self._tensors: list[PlannedTensor] = []
        self._names: set[str] = set()
        self._data_size = 0
        self._next = 0  # index of the next tensor to write
        self._fh = None
        self._tmp: Path | None = None
        if alignment != GGUF_DEFAULT_ALIGNMENT:
            self.add(Keys.General.ALIGNMENT, alignment, ValueType.UINT32)

    # ---- declarations --------------------------------------------------------------------------------------
    def add(self, key: str, value: Any, vtype: ValueType, elem_type: ValueType | None = None) -> None:
        if self._fh is not None:
            raise RuntimeError("metadata must be added before tensor data is written")
        if key in self._kv:
            raise ValueError(f"duplicate metadata key {key!r}")
        if vtype == ValueType.ARRAY and elem_type == ValueType.ARRAY:
            payload = _encode_nested(value)
        else:
            payload = _encode_value(value, vtype, elem_type)
        self._kv[key] = _encode_string(key) + struct.pack("<I", vtype) + payload

    def add_tensor(self, name: str, shape: Sequence[int], ggml_type: GGMLType) -> PlannedTensor:
        if self._fh is not None:
            raise RuntimeError("tensors must be declared before tensor data is written")
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        if len(name.encode()) > 64 - 1:
            raise ValueError(f"tensor name {name!r} is longer than GGUF's 63 bytes")
        shape = tuple(int(d) for d in shape)
        nbytes = tensor_nbytes(ggml_type, int(np.prod(shape, dtype=np.int64)))
        t = PlannedTensor(name, shape, ggml_type, self._data_size, nbytes)
        self._tensors.append(t)
        self._names.add(name)
        self._data_size += nbytes + _pad(nbytes, self.alignment)
        return t

    @property
    def tensors(self) -> list[PlannedTensor]:
        return list(self._tensors)

    def header_bytes(self) -> bytes:
        out = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(self._tensors), len(self._kv))]
        out.extend(self._kv.values())
        for t in self._tensors:
            ne = tuple(reversed(t.shape))
            out.append(_encode_string(t.name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, t.ggml_type, t.offset))
        head = b"".join(out)
        return head + b"\0" * _pad(len(head), self.alignment)

    @property
    def file_size(self) -> int:
        return len(self.header_bytes()) + self._data_size

    # ---- writing -------------------------------------------------------------------------------------------
    def open(self) -> None:
        folder = self.path.parent if str(self.path.parent) else Path(".")
        if not folder.is_dir():
            raise QtoolError(f"{self.path}: output folder {folder} does not exist")
        problem = output_problem(self.path)
        if problem:
            raise QtoolError(problem)
        remove_stale_partials(folder)
        with _signals_held():
            try:
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.path.name}.{os.getpid()}.", suffix=".partial")
            except OSError as e:
                raise QtoolError(f"{self.path}: cannot write to {folder}: {e.strerror}") from None
            self._tmp = Path(tmp)
            self._fh = os.fdopen(fd, "wb", buffering=0)
        self._write_all(self.header_bytes())

    def write_tensor(self, name: str, data: np.ndarray | bytes | memoryview) -> None:
        if self._fh is None:
            self.open()
        if self._next >= len(self._tensors) or self._tensors[self._next].name != name:
            expected = self._tensors[self._next].name if self._next < len(self._tensors) else "none"
            raise RuntimeError(f"tensor {name!r} written out of order (expected {expected})")
        t = self._tensors[self._next]
        buf = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B")
        if buf.nbytes != t.nbytes:
            raise RuntimeError(f"tensor {name!r}: {buf.nbytes} bytes given, {t.nbytes} declared")
        self._write_all(buf)
        self._write_all(b"\0" * _pad(t.nbytes, self.alignment))
        self._next += 1

    def _write_all(self, buf) -> None:
        view = memoryview(buf).cast("B")
        try:
            while view.nbytes:
                n = self._fh.write(view)
                view = view[n:]
        except OSError as e:  # a full disk names the output, not the temporary file (removed by abort)
            raise QtoolError(f"{self.path}: cannot write: {e.strerror or e}") from None

    def close(self) -> None:
        """Finish the file and move it into place; on any failure (fsync, rename) the temporary file is removed
        and an existing output is left as it was."""
        if self._fh is None:
            self.open()
        if self._next != len(self._tensors):
            raise RuntimeError(f"{len(self._tensors) - self._next} tensors declared but not written")
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(self._tmp, 0o666 & ~mask)
            os.replace(self._tmp, self.path)
        except OSError as e:
            self.abort()
            raise QtoolError(f"{self.path}: cannot finish writing: {e.strerror or e}") from None
        except BaseException:
            self.abort()
            raise
        self._tmp = None

    def abort(self) -> None:
        with _signals_held():
            if self._tmp is not None:  # unlinked first: the name goes even if closing fails
                self._tmp.unlink(missing_ok=True)
                self._tmp = None
            if self._fh is not None:
                fh, self._fh = self._fh, None
                with contextlib.suppress(OSError):
                    fh.close()

    def __enter__(self) -> "GGUFWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
