"""Q8_K: super-blocks of 256 weights as float32 scale d, 256 int8 q and 16 int16 sums of q; x = d * q
(ggml's block_q8_K, the activation type of llama.cpp's K-quant dot products; never stored in files).

Layout (292 bytes, little-endian): d:float32 @0, qs[256] (int8) @4, bsums[16] (int16) @260, bsums[j] = sum of
qs[16j .. 16j+15]. Quantization is quantize_row_q8_K_ref (also what ggml-cpu's quantize_row_q8_K runs on x86):
iscale = -127/max where max is the weight of largest magnitude (the first one on ties), q = MIN(127,
nearest_int(iscale*x)), d = 1/iscale.

One difference from C, on purpose: for an all-zero super-block C writes d = 0 and qs = 0 but leaves bsums as
they were in the destination buffer; we write zeros there too (what llama.cpp gives into a zeroed buffer).
"""
import numpy as np
from numba import njit, prange

from qtool.formats.constants import GGMLType

from .kquant_common import MAGIC, QK_K, ggml_nearest_int, largest_magnitude
from .traits import block, fields

BLOCK_BYTES = block(GGMLType.Q8_K)[1]
D, QS, BSUMS = fields(GGMLType.Q8_K, "d", "qs", "bsums")
F0 = np.float32(0.0)
F1 = np.float32(1.0)
FLT_MAX = np.float32(3.4028234663852886e38)
ABS_MASK = 0x7FFFFFFF
INF_BITS = 0x7F800000


@njit(cache=True, inline="always")
def _store_f32(row, pos: int, v) -> None:
    u = np.int64(np.float32(v).view(np.uint32))
    row[pos] = u & 0xFF
    row[pos + 1] = (u >> 8) & 0xFF
    row[pos + 2] = (u >> 16) & 0xFF
    row[pos + 3] = (u >> 24) & 0xFF


@njit(cache=True, inline="always")
def _load_f32(row, pos: int) -> np.float32:
    u = (np.int64(row[pos]) | (np.int64(row[pos + 1]) << 8) | (np.int64(row[pos + 2]) << 16)
         | (np.int64(row[pos + 3]) << 24))
    return np.uint32(u).view(np.float32)


@njit(cache=True, error_model="numpy")
def _bsums(row, o: int) -> None:
    for j in range(QK_K // 16):
        s = 0
        for i in range(16):
            s += np.int64(np.int8(row[o + QS + 16 * j + i]))
        row[o + BSUMS + 2 * j] = s & 0xFF
        row[o + BSUMS + 2 * j + 1] = (s >> 8) & 0xFF


@njit(cache=True, error_model="numpy")
def quantize_block_ref(xb, row, o: int) -> None:
    """quantize_row_q8_K_ref on one super-block xb[:256] → row[o:o+292], plainly transcribed."""
    amax, mx = largest_magnitude(xb, QK_K)
    if amax == F0:
        for k in range(BLOCK_BYTES):
            row[o + k] = 0
        return
    iscale = np.float32(np.float32(-127.0) / mx)
    for j in range(QK_K):
        row[o + QS + j] = min(127, ggml_nearest_int(np.float32(iscale * xb[j]))) & 0xFF
    _bsums(row, o)
    _store_f32(row, o + D, np.float32(F1 / iscale))


@njit(cache=True, error_model="numpy")
def quantize_block(xb, row, o: int) -> None:
    """quantize_row_q8_K_ref on one super-block xb[:256] → row[o:o+292]; vectorised when the block is finite and
    -127/max is finite (then |iscale*x| <= 127 and nearest_int is the plain 1.5*2^23 rounding)."""
    n = xb.shape[0]
    mask = np.int32(ABS_MASK)
    m = np.int32(0)
    for j in range(n):  # largest |x| as float32 bits (ordered like the values; NaN, inf sort last)
        b = np.int32(np.float32(xb[j]).view(np.int32) & mask)
        m = b if b > m else m
    if m >= np.int32(INF_BITS):
        quantize_block_ref(xb, row, o)
        return
    if m == 0:
        for k in range(BLOCK_BYTES):
            row[o + k] = 0
        return
    j = 0
    while np.int32(np.float32(xb[j]).view(np.int32) & mask) != m:  # C keeps the first largest
        j += 1
    iscale = np.float32(np.float32(-127.0) / xb[j])
    if not (abs(iscale) <= FLT_MAX):
        quantize_block_ref(xb, row, o)
        return
    hi = np.float32(127.0)
    n16 = n // 16  # 16, run-time
    for g in range(QK_K // 16):
        s = np.int32(0)
        for i in range(n16):
            r = np.float32(np.float32(np.float32(iscale * xb[16 * g + i]) + MAGIC) - MAGIC)
            r = r if r < hi else hi
            q = np.int32(r)
            row[o + QS + 16 * g + i] = np.uint8(q & np.int32(0xFF))
            s = np.int32(s + q)
        row[o + BSUMS + 2 * g] = np.uint8(s & np.int32(0xFF))
        row[o + BSUMS + 2 * g + 1] = np.uint8((s >> np.int32(8)) & np.int32(0xFF))
    _store_f32(row, o + D, np.float32(F1 / iscale))


@njit(parallel=True, cache=True, error_model="numpy")
def quantize(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q8_K_ref over rows: x float32 (rows, cols) → out uint8 (rows, cols/256*292)."""
    n_rows, n_cols = x.shape
    for r in prange(n_rows):
        for b in range(n_cols // QK_K):
            quantize_block(x[r, b * QK_K:(b + 1) * QK_K], out[r], b * BLOCK_BYTES)


@njit(cache=True, inline="always")
def dequantize_block(row, o: int, y, yo: int) -> None:
    """The block at row[o:] → y[yo:yo+256]: x = d * q."""
    d = _load_f32(row, o + D)
    for j in range(QK_K):
        y[yo + j] = np.float32(d * np.float32(np.int8(row[o + QS + j])))


@njit(parallel=True, cache=True)
def dequantize(q: np.ndarray, out: np.ndarray) -> None:
    """dequantize_row_q8_K over rows: q uint8 (rows, cols/256*292) → out float32 (rows, cols)."""
    for r in prange(out.shape[0]):
        for b in range(out.shape[1] // QK_K):
            dequantize_block(q[r], b * BLOCK_BYTES, out[r], b * QK_K)
