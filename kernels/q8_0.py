"""Q8_0: blocks of 32 weights as fp16 scale d + 32 int8 q; x = d * q (ggml's block_q8_0)."""
import numpy as np
from numba import njit, prange

from qtool.formats.constants import GGMLType

from .common import load_fp16, roundf, store_fp16
from .traits import block, fields

QK, BLOCK_BYTES = block(GGMLType.Q8_0)
D, QS = fields(GGMLType.Q8_0, "d", "qs")


@njit(parallel=True, cache=True)
def quantize(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q8_0_ref over rows: x float32 (rows, cols) → out uint8 (rows, cols/32*34)."""
    n_rows, n_cols = x.shape
    for r in prange(n_rows):
        for b in range(n_cols // QK):
            src = x[r, b * QK:(b + 1) * QK]
            amax = np.float32(0.0)
            for v in src:
                a = abs(v)
                amax = amax if amax > a else a  # ggml's MAX(): a NaN is kept (until a larger value follows)
            d = np.float32(amax / np.float32(127.0))
            inv = np.float32(np.float32(1.0) / d) if d != 0 else np.float32(0.0)
            o = b * BLOCK_BYTES
            store_fp16(out[r], o + D, d)
            for j in range(QK):
                v = roundf(np.float32(src[j] * inv))
                # the C cast of NaN (cvttss2si) is INT_MIN, whose low byte is 0
                out[r, o + QS + j] = (int(v) & 0xFF) if v == v else 0


@njit(parallel=True, cache=True)
def dequantize(q: np.ndarray, out: np.ndarray) -> None:
    n_rows, n_cols = out.shape
    for r in prange(n_rows):
        for b in range(n_cols // QK):
            o = b * BLOCK_BYTES
            d = load_fp16(q[r], o + D)
            for j in range(QK):
                v = np.int8(q[r, o + QS + j])
                out[r, b * QK + j] = d * np.float32(v)


def quantize_weighted(x: np.ndarray, out: np.ndarray, qw: np.ndarray) -> None:
    """llama.cpp's quantize_q8_0 ignores the importance matrix (`(void)quant_weights`): the same bytes as without."""
    quantize(x, out)
