"""The codec of llama.cpp's legacy 32-weight types Q4_0, Q4_1, Q5_0, Q5_1: one row function for all four, and
per type a quantize and a dequantize kernel that call it with the type's flags as constants.

Why one kernel per type rather than one taking the flags: with the flags passed at run time Q4_0..Q5_1
quantized 1.3-1.8x slower (measured on 512x4096, 2 threads); numba's `literally` (one specialization per flag
value) costs seconds of dispatch per call; numba caches neither closures made by a factory nor kernels taking
a kernel as an argument (checked: a cache miss on every run).

Layouts (ggml's block_q4_0 … block_q5_1, little-endian, no padding):

    Q4_0  d:fp16  qs[16]                  x = d * (q - 8)     18 bytes
    Q4_1  d:fp16  m:fp16  qs[16]          x = d * q + m       20 bytes
    Q5_0  d:fp16  qh[4]  qs[16]           x = d * (q - 16)    22 bytes
    Q5_1  d:fp16  m:fp16  qh[4]  qs[16]   x = d * q + m       24 bytes

qs[j] holds weight j in its low nibble and weight j+16 in its high nibble; for the 5-bit types qh, read as a
little-endian uint32, holds bit 4 of weight i in bit i.

Quantization is quantize_row_q*_ref (the path ggml_quantize_chunk takes without an importance matrix):
  "_0" types: m = the weight of largest magnitude (the first on ties, +0 for a block of zeros),
              d = m / -2^(bits-1), q = min(2^bits - 1, (int8_t)(x * (1/d) + 2^(bits-1) + 0.5))
  "_1" types: d = (max - min) / (2^bits - 1), q = (int8_t)((x - min) * (1/d) + 0.5), clamped to 15 for Q4_1
where 1/d is taken of the unrounded float32 d (0 when d is 0), every operation is rounded to float32 on its
own, and there is no fused multiply-add: ggml-quants.c sits in ggml-base, which x86-64 builds compile without
-mfma (the built libggml-base.so does mulps then addps there). gcc compiles the casts to cvttps2dq — truncate,
NaN and out of range giving INT32_MIN — and keeps the low byte; `c_int8` does the same, so blocks holding
inf or NaN, or whose 1/d overflows, come out as llama.cpp writes them.

Speed: a block whose weights and 1/d are finite has every x * (1/d) + bias in [0, 2^bits], where the plain
int32 conversion equals the C cast; that fast path is written as loops numba's LLVM vectorizes. Their trip
count `qk` is 32 computed at run time on purpose: numba leaves LLVM's SLP vectorizer off, so a loop of a
known 32 iterations gets fully unrolled into scalar code instead of vectorized.
"""
import numpy as np
from numba import njit, prange

from qtool.formats.constants import TYPE_INFO, GGMLType

from .common import load_fp16, store_fp16
from .traits import block
from .weighted import QX_SCRATCH, make_qx_quants_w, mean_square, qkx3_many, sigma2_weights

QK = TYPE_INFO[GGMLType.Q4_0].block_size  # the same 32 for all four
Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES = (block(t)[1] for t in
                                                  (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1))
FLT_MAX = np.float32(3.4028234663852886e38)
INF = np.float32(np.inf)


@njit(cache=True, inline="always")
def c_int8(v: np.float32) -> int:
    """(int8_t)v as gcc on x86-64 computes it: truncate to int32 (NaN/out of range → INT32_MIN), keep the low byte."""
    if v >= np.float32(-2147483648.0) and v < np.float32(2147483648.0):
        i = int(v)
    else:
        i = -2147483648
    return ((i & 0xFF) ^ 0x80) - 0x80


@njit(cache=True, inline="always")
def quantize_row(xr, orow, block_bytes, affine, five):
    """One row: xr float32 (cols,) → orow uint8 (cols/32*block_bytes,). affine: Q4_1/Q5_1; five: Q5_0/Q5_1."""
    nb = xr.shape[0] // QK
    if nb == 0:
        return
    qk = xr.shape[0] // nb  # == QK, but opaque to LLVM (see the module docstring)
    half = qk // 2
    codes = np.empty(QK, np.int32)
    levels = np.float32(31.0) if five else np.float32(15.0)
    clamp = np.int32(31 if five else 15)
    neg_half = np.float32(-16.0) if five else np.float32(-8.0)
    if affine:
        bias = np.float32(0.5)
        if five:
            clamp = np.int32(255)  # quantize_row_q5_1_ref casts to uint8_t with no clamp; the low byte is the same
    else:
        bias = np.float32(16.5) if five else np.float32(8.5)
    qh_pos = 4 if affine else 2
    qs_pos = qh_pos + 4 if five else qh_pos
    for b in range(nb):
        c0 = b * QK
        o = b * block_bytes
        nan = False
        if affine:
            lo = FLT_MAX
            hi = -FLT_MAX
            for j in range(QK):
                v = xr[c0 + j]
                if v < lo:
                    lo = v
                if v > hi:
                    hi = v
                nan |= v != v
            d = np.float32(np.float32(hi - lo) / levels)
            store_fp16(orow, o + 2, lo)
            finite = not nan and hi < INF and lo > -INF
        else:
            lo = np.float32(0.0)
            amax = np.float32(0.0)
            m = np.float32(0.0)
            for j in range(QK):
                v = xr[c0 + j]
                if amax < abs(v):
                    amax = abs(v)
                    m = v
                nan |= v != v
            d = np.float32(m / neg_half)
            finite = not nan and amax < INF
        inv = np.float32(np.float32(1.0) / d) if d != 0 else np.float32(0.0)
        store_fp16(orow, o, d)
        if finite and abs(d) < INF and abs(inv) < INF:
            if affine:
                for j in range(qk):
                    t = np.float32(np.float32(xr[c0 + j] - lo) * inv)
                    codes[j] = min(np.int32(np.float32(t + bias)), clamp)
            else:
                for j in range(qk):
                    codes[j] = min(np.int32(np.float32(np.float32(xr[c0 + j] * inv) + bias)), clamp)
        else:
            for j in range(QK):
                t = np.float32(xr[c0 + j] - lo) if affine else xr[c0 + j]
                codes[j] = min(clamp, c_int8(np.float32(np.float32(t * inv) + bias)))
        if five:
            qh = np.uint32(0)
            for j in range(qk):
                qh |= np.uint32((codes[j] >> 4) & 1) << np.uint32(j)
            for k in range(4):
                orow[o + qh_pos + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))
            for j in range(half):
                orow[o + qs_pos + j] = np.uint8((codes[j] & 0x0F) | ((codes[j + QK // 2] & 0x0F) << 4))
        else:  # quantize_row_q4_*_ref stores the whole byte of the low code, then ORs the high one in
            for j in range(half):
                orow[o + qs_pos + j] = np.uint8((codes[j] | (codes[j + QK // 2] << 4)) & 0xFF)


@njit(cache=True, inline="always")
def dequantize_row(qr, yr, block_bytes, affine, five):
    """One row: qr uint8 packed → yr float32: d * (code - 2^(bits-1)), or d * code + m (no fused multiply-add)."""
    nb = yr.shape[0] // QK
    if nb == 0:
        return
    qk = yr.shape[0] // nb
    half = qk // 2
    offset = np.int32(0 if affine else (16 if five else 8))
    qh_pos = 4 if affine else 2
    qs_pos = qh_pos + 4 if five else qh_pos
    for b in range(nb):
        o = b * block_bytes
        c0 = b * QK
        d = load_fp16(qr, o)
        m = load_fp16(qr, o + 2) if affine else np.float32(0.0)
        qh = np.uint32(0)
        if five:
            qh = np.uint32(qr[o + qh_pos]) | (np.uint32(qr[o + qh_pos + 1]) << np.uint32(8)) \
                | (np.uint32(qr[o + qh_pos + 2]) << np.uint32(16)) | (np.uint32(qr[o + qh_pos + 3]) << np.uint32(24))
        for j in range(half):
            byte = np.int32(qr[o + qs_pos + j])
            c_lo = byte & 0x0F
            c_hi = byte >> 4
            if five:
                c_lo |= np.int32((qh >> np.uint32(j)) & np.uint32(1)) << 4
                c_hi |= np.int32((qh >> np.uint32(j + QK // 2)) & np.uint32(1)) << 4
            if affine:
                yr[c0 + j] = np.float32(np.float32(c_lo) * d) + m
                yr[c0 + j + QK // 2] = np.float32(np.float32(c_hi) * d) + m
            else:
                yr[c0 + j] = np.float32(c_lo - offset) * d
                yr[c0 + j + QK // 2] = np.float32(c_hi - offset) * d


@njit(cache=True, inline="always")
def quantize_rows(x, out, block_bytes, affine, five):
    """quantize_row_q{4,5}_{0,1}_ref over rows: x float32 (rows, cols) → out uint8 (rows, cols/32*block_bytes);
    inlined into each type's kernel, so that the flags are constants there."""
    for r in prange(x.shape[0]):
        quantize_row(x[r], out[r], block_bytes, affine, five)


@njit(cache=True, inline="always")
def dequantize_rows(q, out, block_bytes, affine, five):
    """dequantize_row_q{4,5}_{0,1} over rows: q uint8 (rows, cols/32*block_bytes) → out float32 (rows, cols)."""
    for r in prange(out.shape[0]):
        dequantize_row(q[r], out[r], block_bytes, affine, five)


# ---- the kernels: (affine, five) = Q4_0 (no, no), Q4_1 (yes, no), Q5_0 (no, yes), Q5_1 (yes, yes) ----------------
@njit(parallel=True, cache=True)
def quantize_q4_0(x, out):
    quantize_rows(x, out, Q4_0_BYTES, False, False)


@njit(parallel=True, cache=True)
def quantize_q4_1(x, out):
    quantize_rows(x, out, Q4_1_BYTES, True, False)


@njit(parallel=True, cache=True)
def quantize_q5_0(x, out):
    quantize_rows(x, out, Q5_0_BYTES, False, True)


@njit(parallel=True, cache=True)
def quantize_q5_1(x, out):
    quantize_rows(x, out, Q5_1_BYTES, True, True)


@njit(parallel=True, cache=True)
def dequantize_q4_0(q, out):
    dequantize_rows(q, out, Q4_0_BYTES, False, False)


@njit(parallel=True, cache=True)
def dequantize_q4_1(q, out):
    dequantize_rows(q, out, Q4_1_BYTES, True, False)


@njit(parallel=True, cache=True)
def dequantize_q5_0(q, out):
    dequantize_rows(q, out, Q5_0_BYTES, False, True)


@njit(parallel=True, cache=True)
def dequantize_q5_1(q, out):
    dequantize_rows(q, out, Q5_1_BYTES, True, True)


# ---- with an importance matrix: quantize_row_q{4,5}_{0,1}_impl ------------------------------------------------------
# Each block's weights are qw[j] * sqrtf(sigma2 + x[j]^2), sigma2 the mean square of the whole row; the "_0" types
# search their scale with make_qx_quants (nmax 8 / 16), the "_1" types scale and min with make_qkx3_quants
# (nmax 15 / 31, rmin -0.9, rdelta 0.05, 36 steps; all the row's blocks at once, weighted.qkx3_many); stored
# as d = fp16(scale), m = fp16(min).

@njit(cache=True, inline="always", error_model="numpy")
def quantize_row_weighted(xr, orow, qw, block_bytes, affine, five):
    nb = xr.shape[0] // QK
    if nb == 0:
        return
    n = xr.shape[0]
    nmax = 31 if affine and five else (15 if affine else (16 if five else 8))
    qh_pos = 4 if affine else 2
    qs_pos = qh_pos + 4 if five else qh_pos
    sigma2 = mean_square(xr, 0, n)
    weight = np.empty(n, np.float32)
    sigma2_weights(xr, 0, n, sigma2, qw, 0, weight)
    L = np.empty(n, np.uint8)
    scales = np.empty(nb, np.float32)
    mins = np.empty(nb, np.float32)
    if affine:  # all the row's blocks searched at once
        qkx3_many(xr, weight, nb, QK, nmax, L, scales, mins)
    else:
        ts = np.empty(QX_SCRATCH, np.float32)
        for b in range(nb):
            scales[b] = make_qx_quants_w(xr, b * QK, QK, nmax, L, b * QK, weight, b * QK, ts)
    for b in range(nb):
        c0 = b * QK
        o = b * block_bytes
        store_fp16(orow, o, scales[b])
        if affine:
            store_fp16(orow, o + 2, -mins[b])
        if five:
            qh = np.uint32(0)
            for j in range(QK):
                qh |= np.uint32((L[c0 + j] >> 4) & 1) << np.uint32(j)
            for k in range(4):
                orow[o + qh_pos + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))
            for j in range(QK // 2):
                orow[o + qs_pos + j] = np.uint8((L[c0 + j] & 0x0F) | ((L[c0 + j + QK // 2] & 0x0F) << 4))
        else:
            for j in range(QK // 2):
                orow[o + qs_pos + j] = np.uint8((np.int32(L[c0 + j]) | (np.int32(L[c0 + j + QK // 2]) << 4)) & 0xFF)


@njit(cache=True, inline="always", error_model="numpy")
def quantize_rows_weighted(x, out, qw, block_bytes, affine, five):
    for r in prange(x.shape[0]):
        quantize_row_weighted(x[r], out[r], qw, block_bytes, affine, five)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_q4_0_weighted(x, out, qw):
    quantize_rows_weighted(x, out, qw, Q4_0_BYTES, False, False)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_q4_1_weighted(x, out, qw):
    quantize_rows_weighted(x, out, qw, Q4_1_BYTES, True, False)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_q5_0_weighted(x, out, qw):
    quantize_rows_weighted(x, out, qw, Q5_0_BYTES, False, True)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_q5_1_weighted(x, out, qw):
    quantize_rows_weighted(x, out, qw, Q5_1_BYTES, True, True)
