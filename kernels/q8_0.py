"""Q8_0: blocks of 32 weights as fp16 scale d + 32 int8 q; x = d * q (ggml's block_q8_0)."""
import numpy as np
from numba import njit, prange

from .common import load_fp16, roundf, store_fp16

QK = 32
BLOCK_BYTES = 34


@njit(parallel=True, cache=True)
def quantize(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q8_0_ref over rows: x float32 (rows, cols) → out uint8 (rows, cols/32*34)."""
    n_rows, n_cols = x.shape
    for r in prange(n_rows):
        for b in range(n_cols // QK):
            src = x[r, b * QK:(b + 1) * QK]
            amax = np.float32(0.0)
            for v in src:
                if abs(v) > amax:
                    amax = abs(v)
            d = np.float32(amax / np.float32(127.0))
            inv = np.float32(np.float32(1.0) / d) if d != 0 else np.float32(0.0)
            o = b * BLOCK_BYTES
            store_fp16(out[r], o, d)
            for j in range(QK):
                q = int(roundf(np.float32(src[j] * inv)))
                out[r, o + 2 + j] = q & 0xFF


@njit(parallel=True, cache=True)
def dequantize(q: np.ndarray, out: np.ndarray) -> None:
    n_rows, n_cols = out.shape
    for r in prange(n_rows):
        for b in range(n_cols // QK):
            o = b * BLOCK_BYTES
            d = load_fp16(q[r], o)
            for j in range(QK):
                v = np.int8(q[r, o + 2 + j])
                out[r, b * QK + j] = d * np.float32(v)
