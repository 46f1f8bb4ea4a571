"""Quantize and dequantize kernels, one codec module per ggml type (or family of types), imported on first use.

What the kernels know about each type is one row of traits.py's table: its block layout, codec, activation
type, decode kernel and tile dequantizer; the tables here and in matmul.py derive from it. Each codec defines
numba kernels quantize(x, out) (float32 rows → packed bytes in llama.cpp's block layout) and dequantize(q, out),
both parallel over rows. Importing this package compiles nothing, so `qtool --help` stays fast.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from qtool.formats.constants import TYPE_INFO, GGMLType

from .traits import TRAITS, Traits, quantizable_types  # noqa: F401 (quantizable_types: public)

# ggml type → module in this package holding its codec, from the traits table
_MODULES: dict[GGMLType, str] = {t: r.codec for t, r in TRAITS.items() if r.codec is not None}


# modules whose numba functions or constants other modules here inline or call: numba's cache=True notices edits
# to a kernel's own file only, so an edit to one of these (a `git pull`, say) would leave every other kernel's
# cache stale
_SHARED_SOURCES = ("common.py", "legacy.py", "kquant_common.py", "traits.py",  # traits: field offsets
                   "weighted.py", "matvec.py",  # matvec: the block readers the codecs' decode kernels inline
                   "iq_grids.py", "iq2.py")  # the IQ grids, frozen into kernels as constants; iq2: IQ1's search


def _drop_stale_cache() -> None:
    here = Path(__file__).parent
    cache = here / "__pycache__"
    digest = hashlib.sha256(b"".join((here / f).read_bytes() for f in _SHARED_SOURCES)).hexdigest()
    stamp = cache / "numba-shared-sources.sha256"
    try:
        if stamp.read_text() == digest:
            return
    except OSError:
        pass
    try:  # an unwritable install keeps whatever cache it has (numba then caches elsewhere)
        for f in [*cache.glob("*.nbi"), *cache.glob("*.nbc")]:
            f.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:
        pass


_drop_stale_cache()


def _traits(ggml_type: GGMLType) -> Traits:
    row = TRAITS.get(ggml_type)
    if row is None or row.codec is None:
        raise ValueError(f"no kernel for type {ggml_type.name}")
    return row


def row_bytes(ggml_type: GGMLType, n_cols: int) -> int:
    info = TYPE_INFO[ggml_type]
    if n_cols % info.block_size:
        raise ValueError(f"row of {n_cols} is not a multiple of {ggml_type.name}'s block of {info.block_size}")
    return n_cols // info.block_size * info.type_size


def quantize(ggml_type: GGMLType, x: np.ndarray, out: np.ndarray | None = None,
             quant_weights: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, cols) → uint8 (rows, row_bytes) in llama.cpp's layout for ggml_type (into `out` if given,
    a C-contiguous uint8 array of that shape). quant_weights: an importance per column (an imatrix row), for the
    types whose traits row names a weighted quantizer (llama.cpp's quantize_row_*_impl); others raise
    NotImplementedError."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = x.reshape(-1, x.shape[-1])
    shape = (rows.shape[0], row_bytes(ggml_type, rows.shape[1]))
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous uint8 of shape {shape}")
    _traits(ggml_type).quantize(rows, out, quant_weights)
    return out


def dequantize(ggml_type: GGMLType, data: np.ndarray, n_cols: int) -> np.ndarray:
    """uint8 packed rows → float32 (rows, n_cols)."""
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, row_bytes(ggml_type, n_cols))
    out = np.empty((data.shape[0], n_cols), dtype=np.float32)
    _traits(ggml_type).dequantize(data, out)
    return out


def _in_cache(kernel) -> bool:
    """Whether numba's on-disk cache holds a compiled version of this kernel for its current source (through
    numba's cache index; if numba's internals differ, assume it does, so that nothing is announced wrongly)."""
    try:
        return bool(kernel._cache._cache_file._load_index())
    except Exception:
        return True


def uncompiled(types) -> list[GGMLType]:
    """Of these weight types, those whose runner kernels (decode kernel and tile dequantizer) numba has not
    compiled into its cache yet: their first use compiles them (seconds each), worth saying so once."""
    out = []
    for t in types:
        row = TRAITS.get(t)
        if row is None:
            continue
        names = [row.fused] if row.fused else []
        names.append(row.tile or (f"{row.codec}.{row.kernels[1]}" if row.codec else None))
        from .traits import _load
        if not all(_in_cache(_load(n)) for n in names if n):
            out.append(t)
    return out
