"""Quantize and dequantize kernels, one module per ggml type, imported on first use.

Each module defines numba kernels `quantize(x, out)` (float32 rows → packed bytes in llama.cpp's block
layout) and `dequantize(q, out)`, both parallel over rows. Importing this package compiles nothing, so
`qtool --help` stays fast.
"""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import numpy as np

from qtool.formats.constants import TYPE_INFO, GGMLType

# ggml type → module in this package holding its kernels
_MODULES: dict[GGMLType, str] = {
    GGMLType.Q8_0: "q8_0",
    GGMLType.Q4_0: "q4_0",
    GGMLType.Q4_1: "q4_1",
    GGMLType.Q5_0: "q5_0",
    GGMLType.Q5_1: "q5_1",
    GGMLType.Q2_K: "q2_k",
    GGMLType.Q4_K: "q4_k",
    GGMLType.Q5_K: "q5_k",
    GGMLType.Q3_K: "q3_k",
    GGMLType.Q6_K: "q6_k",
    GGMLType.Q8_K: "q8_k",  # activations of K-quant dot products (the runner); recipes never write it
}


# modules whose numba functions other modules here inline: numba's cache=True notices edits to a kernel's own
# file only, so an edit to one of these (a `git pull`, say) would leave every other kernel's cache stale
_SHARED_SOURCES = ("common.py", "legacy.py", "kquant_common.py", "matvec.py")  # matvec: h2f


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


def quantizable_types() -> tuple[GGMLType, ...]:
    return tuple(_MODULES)


def _module(ggml_type: GGMLType):
    try:
        name = _MODULES[ggml_type]
    except KeyError:
        raise ValueError(f"no kernel for type {ggml_type.name}") from None
    return importlib.import_module(f"{__name__}.{name}")


def row_bytes(ggml_type: GGMLType, n_cols: int) -> int:
    info = TYPE_INFO[ggml_type]
    if n_cols % info.block_size:
        raise ValueError(f"row of {n_cols} is not a multiple of {ggml_type.name}'s block of {info.block_size}")
    return n_cols // info.block_size * info.type_size


def quantize(ggml_type: GGMLType, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, cols) → uint8 (rows, row_bytes) in llama.cpp's layout for ggml_type (into `out` if given,
    a C-contiguous uint8 array of that shape)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = x.reshape(-1, x.shape[-1])
    shape = (rows.shape[0], row_bytes(ggml_type, rows.shape[1]))
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous uint8 of shape {shape}")
    _module(ggml_type).quantize(rows, out)
    return out


def dequantize(ggml_type: GGMLType, data: np.ndarray, n_cols: int) -> np.ndarray:
    """uint8 packed rows → float32 (rows, n_cols)."""
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, row_bytes(ggml_type, n_cols))
    out = np.empty((data.shape[0], n_cols), dtype=np.float32)
    _module(ggml_type).dequantize(data, out)
    return out
