"""Importance-matrix files as llama.cpp writes them: the GGUF imatrix format (read and write) and the legacy `.dat`
format of `llama-imatrix --output-format dat` (read).

API:
    read_imatrix(path) -> ImatrixData          # either format, sniffed by the GGUF magic; QtoolError on bad input
    write_imatrix(path, data: ImatrixData)     # GGUF format, atomically (temp file + rename)
    ImatrixData.importance(name) -> np.ndarray # float32, in_sum2 / counts per expert row, as llama-quantize
                                               # computes it; flat (n_mat * n_cols,), what ggml_quantize_chunk takes
    ImatrixData.importances() -> dict[str, np.ndarray]
    ImatrixData.entries: dict[str, ImatrixEntry]  # ImatrixEntry(in_sum2 (n_mat, n_cols) f32, counts (n_mat,) f32,
                                                  #              in_sum (n_mat, n_cols) f32 | None)

GGUF layout: `general.type = "imatrix"`, `imatrix.datasets` (string array), `imatrix.chunk_count`,
`imatrix.chunk_size` (u32); per weight tensor `<name>.in_sum2` (ggml ne = [n_cols, n_mat], trailing 1 dropped),
`<name>.counts` (ne = [1, n_mat]) and optionally `<name>.in_sum`, all F32, entries in sorted name order.

Legacy `.dat` (all little-endian int32 / float32): n_entries; per entry name length, name bytes, ncall, nval,
nval floats holding (in_sum2 / count) * ncall; then the last chunk number, and a dataset name length and bytes
(both optional in old files). The legacy file keeps no chunk size, so its entries carry counts = ncall and sums
as stored: importance is then stored / ncall, which is exactly llama-quantize's legacy division.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from qtool.errors import QtoolError
from qtool.formats.constants import GGUF_MAGIC, IMATRIX_GENERAL_TYPE, GGMLType, Keys, ValueType

_K = Keys.IMatrix
_SUFFIXES = {".in_sum2": "in_sum2", ".counts": "counts", ".in_sum": "in_sum"}
MAX_NAME = 1 << 16  # a tensor name longer than this is a corrupt length field, not a name


@dataclass
class ImatrixEntry:
    in_sum2: np.ndarray  # (n_mat, n_cols) float32: per expert (1 for dense tensors), Σ x² over tokens per column
    counts: np.ndarray  # (n_mat,) float32: tokens summed per expert (legacy files: ncall)
    in_sum: Optional[np.ndarray] = None  # (n_mat, n_cols) float32: Σ x, when the writer kept it

    @property
    def n_mat(self) -> int:
        return int(self.in_sum2.shape[0])

    @property
    def n_cols(self) -> int:
        return int(self.in_sum2.shape[1])


@dataclass
class ImatrixData:
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: Optional[int] = None  # None for legacy files, which do not record it
    legacy: bool = False
    path: Optional[Path] = None

    def importance(self, name: str) -> np.ndarray:
        """llama-quantize's per-column weight for `name`: in_sum2 / count in float32 per expert row; a row whose
        count is 0 (an expert calibration never reached) is all 1 (GGUF) or the raw sums (legacy, as quantize)."""
        e = self.entries[name]
        out = np.empty_like(e.in_sum2)
        for j in range(e.n_mat):
            c = np.float32(e.counts[j])
            if c > 0:
                out[j] = e.in_sum2[j] / c
            else:
                out[j] = e.in_sum2[j] if self.legacy else np.float32(1)
        return out.reshape(-1)

    def importances(self) -> dict[str, np.ndarray]:
        return {name: self.importance(name) for name in self.entries}


def _fail(path, problem: str) -> QtoolError:
    return QtoolError(f"{path}: {problem}")


def _check_finite(path, name: str, arr: np.ndarray) -> None:
    if not np.isfinite(arr).all():
        raise _fail(path, f"imatrix entry {name!r} holds NaN or infinite values")


def read_imatrix(path: str | os.PathLike) -> ImatrixData:
    """Read an importance matrix written by llama-imatrix (GGUF or legacy .dat) or by qtool."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise QtoolError(f"{path}: cannot open: {e.strerror}") from None
    if len(head) == 4 and struct.unpack("<I", head)[0] == GGUF_MAGIC:
        return _read_gguf(path)
    return _read_legacy(path)


def _read_gguf(path: Path) -> ImatrixData:
    from qtool.formats.gguf_reader import GGUFFile

    with GGUFFile(path) as g:
        gtype = g.get(Keys.General.TYPE)
        if gtype != IMATRIX_GENERAL_TYPE:
            raise _fail(path, f"not an imatrix file (general.type is {gtype!r}, expected 'imatrix')")
        datasets = g.get(_K.DATASETS, [])
        if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
            raise _fail(path, f"{_K.DATASETS} is not an array of strings")
        counts_meta = {}
        for key in (_K.CHUNK_COUNT, _K.CHUNK_SIZE):
            v = g.get(key)
            if v is None:
                raise _fail(path, f"missing {key}")
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise _fail(path, f"{key} is {v!r}, not a non-negative integer")
            counts_meta[key] = int(v)

        parts: dict[str, dict[str, np.ndarray]] = {}
        for tname, info in g.tensors.items():
            # ".in_sum2" before ".in_sum": the longer suffix first, else in_sum2 tensors would be misread
            for suffix, kind in _SUFFIXES.items():
                if tname.endswith(suffix) and len(tname) > len(suffix):
                    break
            else:
                continue  # llama.cpp ignores other tensors too
            if info.ggml_type != GGMLType.F32:
                raise _fail(path, f"tensor {tname!r} is {info.ggml_type.name}, imatrix tensors are F32")
            parts.setdefault(tname[:-len(suffix)], {})[kind] = np.array(g.array(tname), dtype=np.float32)

    if not parts:
        raise _fail(path, "no imatrix entries (no <name>.in_sum2 / <name>.counts tensors)")
    entries = {}
    for name in sorted(parts):
        p = parts[name]
        if "in_sum2" not in p or "counts" not in p:
            missing = "in_sum2" if "in_sum2" not in p else "counts"
            raise _fail(path, f"imatrix entry {name!r} has no {name}.{missing} tensor")
        counts = p["counts"].reshape(-1)
        n_mat = counts.size
        sums = p["in_sum2"].reshape(-1)
        if n_mat == 0 or sums.size == 0 or sums.size % n_mat:
            raise _fail(path, f"imatrix entry {name!r}: {sums.size} sums do not split into {n_mat} count rows")
        _check_finite(path, name, sums)
        _check_finite(path, name, counts)
        if (counts < 0).any():
            raise _fail(path, f"imatrix entry {name!r} has a negative count")
        in_sum = p.get("in_sum")
        if in_sum is not None:
            if in_sum.size != sums.size:
                raise _fail(path, f"imatrix entry {name!r}: in_sum has {in_sum.size} values, in_sum2 {sums.size}")
            _check_finite(path, name, in_sum)
            in_sum = in_sum.reshape(n_mat, -1)
        entries[name] = ImatrixEntry(sums.reshape(n_mat, -1), counts, in_sum)
    return ImatrixData(entries, list(datasets), counts_meta[_K.CHUNK_COUNT], counts_meta[_K.CHUNK_SIZE],
                       legacy=False, path=path)


class _Cursor:
    """Bounds-checked little-endian reads from a byte buffer."""

    def __init__(self, path: Path, buf: bytes):
        self.path, self.buf, self.pos = path, buf, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise _fail(self.path, f"truncated: {what} at byte {self.pos} needs {n} bytes, file has {len(self.buf)}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos


def _read_legacy(path: Path) -> ImatrixData:
    try:
        buf = path.read_bytes()
    except OSError as e:
        raise QtoolError(f"{path}: cannot read: {e.strerror}") from None
    cur = _Cursor(path, buf)
    n_entries = cur.i32("entry count")
    # each entry needs at least 16 bytes: rejects files that are neither GGUF nor .dat before looping on garbage
    if n_entries < 1 or n_entries * 16 > cur.left:
        raise _fail(path, f"not an imatrix file (neither GGUF nor legacy .dat: entry count {n_entries})")
    entries = {}
    for i in range(n_entries):
        n = cur.i32(f"entry #{i} name length")
        if not 0 < n <= MAX_NAME:
            raise _fail(path, f"entry #{i} name length {n} is invalid")
        try:
            name = cur.take(n, f"entry #{i} name").decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(path, f"entry #{i} name is not valid UTF-8") from None
        ncall = cur.i32(f"entry {name!r} call count")
        nval = cur.i32(f"entry {name!r} value count")
        if nval < 1 or ncall < 0:
            raise _fail(path, f"entry {name!r}: {nval} values and {ncall} calls are invalid")
        vals = np.frombuffer(cur.take(4 * nval, f"entry {name!r} values"), dtype="<f4").astype(np.float32)
        _check_finite(path, name, vals)
        if name in entries:
            raise _fail(path, f"duplicate imatrix entry {name!r}")
        entries[name] = ImatrixEntry(vals.reshape(1, -1), np.array([ncall], dtype=np.float32))
    # trailer, optional in old files (llama.cpp reads it only if present): last chunk, then the dataset name
    chunk_count, datasets = 0, []
    if cur.left >= 4:
        chunk_count = cur.i32("chunk count")
        if chunk_count < 0:
            raise _fail(path, f"chunk count {chunk_count} is negative")
        if cur.left >= 4:
            n = cur.i32("dataset name length")
            if not 0 <= n <= cur.left:
                raise _fail(path, f"truncated: dataset name of {n} bytes, {cur.left} left")
            datasets = [cur.take(n, "dataset name").decode("utf-8", errors="replace")]
    if cur.left:
        raise _fail(path, f"{cur.left} unexpected bytes after the imatrix data")
    return ImatrixData(entries, datasets, chunk_count, None, legacy=True, path=path)


def write_imatrix(path: str | os.PathLike, data: ImatrixData) -> int:
    """Write `data` in the GGUF imatrix format llama-imatrix writes; returns the file size."""
    from qtool.formats.gguf_writer import GGUFWriter

    w = GGUFWriter(path)
    w.add(Keys.General.TYPE, IMATRIX_GENERAL_TYPE, ValueType.STRING)
    w.add(_K.DATASETS, list(data.datasets), ValueType.ARRAY, ValueType.STRING)
    w.add(_K.CHUNK_COUNT, int(data.chunk_count), ValueType.UINT32)
    w.add(_K.CHUNK_SIZE, int(data.chunk_size or 0), ValueType.UINT32)
    order = []
    for name in sorted(data.entries):
        e = data.entries[name]
        if e.in_sum2.ndim != 2 or np.size(e.counts) != e.n_mat or (e.in_sum is not None and
                                                                   np.shape(e.in_sum) != e.in_sum2.shape):
            raise QtoolError(f"{path}: imatrix entry {name!r}: sums {e.in_sum2.shape} do not match counts "
                             f"{np.shape(e.counts)}")
        # ggml_n_dims drops a trailing dimension of 1: dense tensors are 1-D, MoE ones (n_mat, n_cols)
        row_shape = (e.n_cols,) if e.n_mat == 1 else (e.n_mat, e.n_cols)
        count_shape = (1,) if e.n_mat == 1 else (e.n_mat, 1)
        tensors = [(_K.SUM2_TENSOR, e.in_sum2, row_shape), (_K.COUNTS_TENSOR, e.counts, count_shape)]
        if e.in_sum is not None:
            tensors.append((_K.SUM_TENSOR, e.in_sum, row_shape))
        for template, arr, shape in tensors:
            tname = template.format(name=name)
            try:
                w.add_tensor(tname, shape, GGMLType.F32)
            except ValueError as e:  # a name past GGUF's 63 bytes, or a duplicate
                raise QtoolError(f"{path}: cannot write imatrix entry {name!r}: {e}") from None
            order.append((tname, np.ascontiguousarray(arr, dtype="<f4").reshape(shape)))
    with w:
        for tname, arr in order:
            w.write_tensor(tname, arr)
    return w.file_size
