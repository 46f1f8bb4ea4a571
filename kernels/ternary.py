"""TQ1_0 and TQ2_0: BitNet b1.58's ternary types, super-blocks of 256 weights x = d * t, t in {-1, 0, 1}, with
d = the block's largest magnitude (block_tq1_0, block_tq2_0; quantize_row_tq1_0_ref / tq2_0_ref).

Layouts (little-endian):
- TQ1_0 (54 bytes, 1.6875 bits per weight): qs[48] @0, qh[4] @48, d:fp16 @52. A byte holds 5 trits (3^5 = 243 <=
  256) as a base-3 fraction: the trits' base-3 number n (first trit most significant) is stored as
  ceil(n * 256 / 243), so that trit k is the integer part of (byte * 3^k mod 256) * 3 / 256 — a multiply and a
  shift per trit, no division. qs[m] (m < 32) holds weights m + 32k, k = 0..4; qs[32 + m] (m < 16) weights
  160 + m + 16k; qh[j] holds weights 240 + j + 4k, k = 0..3, in its top four trits (the fifth is 0).
- TQ2_0 (66 bytes, 2.0625 bits per weight): qs[64] @0, d:fp16 @64. t + 1 in two bits: qs[32h + m] holds weights
  128h + m + 32k in bits 2k, 2k+1.

llama.cpp's quantize_tq1_0 / tq2_0 take an importance matrix and ignore it; their traits rows say so
(ignores_imatrix), and there is no weighted kernel here. The decode kernels' dot products are against Q8_K
activations (ggml_vec_dot_tq*_q8_K): sum (t + 1) * q, an integer, minus sum q (the activations' sums of 16), times
d * dx.
"""
import numpy as np
from numba import njit, prange

from qtool.formats.constants import QK_K, GGMLType

from .common import load_fp16, roundf, store_fp16
from .matvec import ACC0, F0, ONE, _acc, _f16, _i16, _put
from .traits import block, fields

TQ1_BYTES = block(GGMLType.TQ1_0)[1]
TQ1_QS, TQ1_QH, TQ1_D = fields(GGMLType.TQ1_0, "qs", "qh", "d")
TQ2_BYTES = block(GGMLType.TQ2_0)[1]
TQ2_QS, TQ2_D = fields(GGMLType.TQ2_0, "qs", "d")
POW3 = np.array([1, 3, 9, 27, 81], dtype=np.int64)
TWO63 = 9.223372036854775808e18


# ---- quantize ----------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _lround_plus_one(v: np.float32) -> int:
    """C's `lroundf(v) + 1` as the int it is stored in, which only its low bits reach: glibc converts values
    out of long's range, and NaN, with cvttss2si (LONG_MIN), whose low 32 bits are 0. For rows whose weights all
    lie within the block's maximum this is -1..1 + 1; a NaN in the block (ggml's MAX drops it) lets others exceed it."""
    if not abs(v) < TWO63:
        return 1
    return int(roundf(v)) + 1


@njit(cache=True, inline="always")
def _scale(x, o: int, out, pos: int) -> np.float32:
    """The block's d = amax as fp16 at out[pos:], and C's id = d ? 1/d : 0 (from the float32 amax)."""
    amax = F0
    for j in range(QK_K):
        a = abs(x[o + j])
        amax = amax if amax > a else a  # ggml's MAX(): a NaN is kept until the next value replaces it
    store_fp16(out, pos, amax)
    return np.float32(np.float32(1.0) / amax) if amax != F0 else F0


@njit(cache=True, inline="always")
def _pack5(x, o: int, stride: int, n: int, id_: np.float32) -> int:
    """n trits of x[o], x[o + stride], ... (first most significant, as uint8 arithmetic wraps) padded to 5 digits
    and stored as ceil(number * 256 / 243)."""
    q = 0
    for k in range(n):
        q = (q * 3 + _lround_plus_one(np.float32(x[o + k * stride] * id_))) & 0xFF
    for k in range(n, 5):
        q = (q * 3) & 0xFF
    return ((q * 256 + 242) // 243) & 0xFF


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_tq1_0(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_tq1_0_ref over rows: x float32 (rows, cols) → out uint8 (rows, cols/256*54)."""
    for r in prange(x.shape[0]):
        xr = x[r]
        orow = out[r]
        for b in range(x.shape[1] // QK_K):
            o = b * QK_K
            p = b * TQ1_BYTES
            id_ = _scale(xr, o, orow, p + TQ1_D)
            for m in range(32):
                orow[p + TQ1_QS + m] = _pack5(xr, o + m, 32, 5, id_)
            for m in range(16):
                orow[p + TQ1_QS + 32 + m] = _pack5(xr, o + 160 + m, 16, 5, id_)
            for j in range(4):
                orow[p + TQ1_QH + j] = _pack5(xr, o + 240 + j, 4, 4, id_)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_tq2_0(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_tq2_0_ref over rows: x float32 (rows, cols) → out uint8 (rows, cols/256*66)."""
    for r in prange(x.shape[0]):
        xr = x[r]
        orow = out[r]
        for b in range(x.shape[1] // QK_K):
            o = b * QK_K
            p = b * TQ2_BYTES
            id_ = _scale(xr, o, orow, p + TQ2_D)
            for h in range(2):
                for m in range(32):
                    q = 0
                    for k in range(4):
                        t = _lround_plus_one(np.float32(xr[o + 128 * h + 32 * k + m] * id_))
                        q = (q + ((t & 3) << (2 * k))) & 0xFF
                    orow[p + TQ2_QS + 32 * h + m] = q


# ---- dequantize --------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _trit(v, k: int) -> int:
    """Trit k (0 first) of a TQ1_0 byte, 0..2 (t + 1): the integer part of (v * 3^k mod 256) * 3 / 256."""
    return (((v * POW3[k]) & 0xFF) * 3) >> 8


@njit(parallel=True, cache=True)
def dequantize_tq1_0(q: np.ndarray, out: np.ndarray) -> None:
    """dequantize_row_tq1_0 over rows: x = (t - 1) * d (as gguf-py)."""
    for r in prange(out.shape[0]):
        qr = q[r]
        y = out[r]
        for b in range(out.shape[1] // QK_K):
            p = b * TQ1_BYTES
            o = b * QK_K
            d = load_fp16(qr, p + TQ1_D)
            for k in range(5):
                for m in range(32):
                    y[o + 32 * k + m] = d * np.float32(_trit(np.int64(qr[p + TQ1_QS + m]), k) - 1)
                for m in range(16):
                    y[o + 160 + 16 * k + m] = d * np.float32(_trit(np.int64(qr[p + TQ1_QS + 32 + m]), k) - 1)
            for k in range(4):
                for j in range(4):
                    y[o + 240 + 4 * k + j] = d * np.float32(_trit(np.int64(qr[p + TQ1_QH + j]), k) - 1)


@njit(parallel=True, cache=True)
def dequantize_tq2_0(q: np.ndarray, out: np.ndarray) -> None:
    """dequantize_row_tq2_0 over rows: x = (2-bit code - 1) * d (as gguf-py; code 3 gives 2d)."""
    for r in prange(out.shape[0]):
        qr = q[r]
        y = out[r]
        for b in range(out.shape[1] // QK_K):
            p = b * TQ2_BYTES
            o = b * QK_K
            d = load_fp16(qr, p + TQ2_D)
            for h in range(2):
                for k in range(4):
                    for m in range(32):
                        v = (np.int64(qr[p + TQ2_QS + 32 * h + m]) >> (2 * k)) & 3
                        y[o + 128 * h + 32 * k + m] = d * np.float32(v - 1)


# ---- fused decode kernels (matvec.py's planes: w (N, block bytes, lanes); xq (T, 256, lanes) int16; xd (T, lanes);
# xb (T, 16, lanes) the sums of each 16 codes). Codes t + 1 <= 3 times |q| <= 127: int16 partial sums of 32 -------
@njit(cache=True, inline="always")
def _code_sum(xb, t, b) -> np.float32:
    s = F0
    for j in range(16):
        s += xb[t, j, b]
    return s


@njit(parallel=True, cache=True, fastmath=True)
def mv_tq1_0(w, xq, xd, xb, seg, group, out):
    """block_tq1_0 (54 bytes): qs[48], qh[4], d; trits decoded by multiply and shift (see the module doc)."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                isum = F0
                for k in range(5):
                    s = np.int16(0)
                    for m in range(32):
                        c = (_i16(np.uint8(w[r, TQ1_QS + m, b] * POW3[k])) * 3) >> 8
                        s = _i16(s + _i16(c) * xq[t, 32 * k + m, b])
                    s2 = np.int16(0)
                    for m in range(16):
                        c = (_i16(np.uint8(w[r, TQ1_QS + 32 + m, b] * POW3[k])) * 3) >> 8
                        s2 = _i16(s2 + _i16(c) * xq[t, 160 + 16 * k + m, b])
                    isum += np.float32(s) + np.float32(s2)
                s = np.int16(0)
                for k in range(4):
                    for j in range(4):
                        c = (_i16(np.uint8(w[r, TQ1_QH + j, b] * POW3[k])) * 3) >> 8
                        s = _i16(s + _i16(c) * xq[t, 240 + 4 * k + j, b])
                isum += np.float32(s)
                acc = _acc(acc, seg[b], xd[t, b] * _f16(w, r, TQ1_D, b) * (isum - _code_sum(xb, t, b)))
            _put(out, t, r, group, acc, ONE)


@njit(parallel=True, cache=True, fastmath=True)
def mv_tq2_0(w, xq, xd, xb, seg, group, out):
    """block_tq2_0 (66 bytes): qs[64], d; weight = d * (2-bit code - 1)."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                isum = F0
                for h in range(2):
                    for k in range(4):
                        s = np.int16(0)
                        for m in range(32):
                            c = (w[r, TQ2_QS + 32 * h + m, b] >> (2 * k)) & 3
                            s = _i16(s + _i16(c) * xq[t, 128 * h + 32 * k + m, b])
                        isum += np.float32(s)
                acc = _acc(acc, seg[b], xd[t, b] * _f16(w, r, TQ2_D, b) * (isum - _code_sum(xb, t, b)))
            _put(out, t, r, group, acc, ONE)
