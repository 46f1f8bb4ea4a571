"""Q5_1: 32 weights per block as an fp16 scale d, an fp16 minimum m and 5-bit codes q; x = d * q + m.

ggml's block_q5_1; layout, rounding rules and the shared row code are in legacy.py.
"""
import numpy as np
from numba import njit, prange

from .legacy import dequantize_row, quantize_row

BLOCK_BYTES = 24


@njit(parallel=True, cache=True)
def quantize(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q5_1_ref over rows: x float32 (rows, cols) → out uint8 (rows, cols/32*24)."""
    for r in prange(x.shape[0]):
        quantize_row(x[r], out[r], BLOCK_BYTES, True, True)


@njit(parallel=True, cache=True)
def dequantize(q: np.ndarray, out: np.ndarray) -> None:
    """dequantize_row_q5_1 over rows: q uint8 (rows, cols/32*24) → out float32 (rows, cols)."""
    for r in prange(out.shape[0]):
        dequantize_row(q[r], out[r], BLOCK_BYTES, True, True)
