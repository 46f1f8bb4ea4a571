"""llama.cpp itself as the oracle: its quantizer and loader, through the llama-cpp-python package.

Tests that need it call `need_llama_cpp()` first, which skips when the reference extra is not installed.
"""
from __future__ import annotations

import ctypes
import pathlib

import numpy as np
import pytest

from qtool.formats.constants import TYPE_INFO, GGMLType


def need_llama_cpp():
    return pytest.importorskip("llama_cpp", reason="needs the reference extra (llama-cpp-python)")


_ggml = None


def _libggml() -> ctypes.CDLL:
    global _ggml
    if _ggml is None:
        llama_cpp = need_llama_cpp()
        libdir = pathlib.Path(llama_cpp.__file__).parent / "lib"
        candidates = sorted(libdir.glob("libggml-base.*")) + sorted(libdir.glob("libggml.*"))
        lib = ctypes.CDLL(str(candidates[0]))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        _ggml = lib
    return _ggml


def ggml_quantize(x: np.ndarray, ggml_type: GGMLType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's ggml_quantize_chunk (the path llama-quantize takes) on float32 rows; imatrix: float32 (cols,)
    importance weights, or None for none."""
    lib = _libggml()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_rows, n_cols = x.shape
    info = TYPE_INFO[ggml_type]
    out = np.zeros((n_rows, n_cols // info.block_size * info.type_size), dtype=np.uint8)
    lib.ggml_quantize_init(int(ggml_type))
    qw = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert imatrix.shape == (n_cols,)
        qw = imatrix.ctypes.data
    written = lib.ggml_quantize_chunk(int(ggml_type), x.ctypes.data, out.ctypes.data, 0, n_rows, n_cols, qw)
    assert written == out.nbytes
    return out
