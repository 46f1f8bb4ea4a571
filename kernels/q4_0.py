"""Q4_0: 32 weights per block as an fp16 scale d and 4-bit codes q; x = d * (q - 8).

ggml's block_q4_0; layout, rounding rules and the shared row code are in legacy.py.
"""
import numpy as np
from numba import njit, prange

from .legacy import dequantize_row, quantize_row

BLOCK_BYTES = 18


@njit(parallel=True, cache=True)
def quantize(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q4_0_ref over rows: x float32 (rows, cols) → out uint8 (rows, cols/32*18)."""
    for r in prange(x.shape[0]):
        quantize_row(x[r], out[r], BLOCK_BYTES, False, False)


@njit(parallel=True, cache=True)
def dequantize(q: np.ndarray, out: np.ndarray) -> None:
    """dequantize_row_q4_0 over rows: q uint8 (rows, cols/32*18) → out float32 (rows, cols)."""
    for r in prange(out.shape[0]):
        dequantize_row(q[r], out[r], BLOCK_BYTES, False, False)
