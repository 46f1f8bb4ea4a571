"""Q4_K and Q5_K, the K-quants with 8 sub-blocks of 32 and 6-bit scales and mins: one codec, the two types
differing only in the width of their codes (the 5th bit of Q5_K in qh) and their search parameters.

Q4_K: super-blocks of 256 weights in 8 sub-blocks of 32, x = (d*sc)*q - (dmin*m) (ggml's block_q4_K).

Layout (144 bytes, little-endian): d:fp16 @0, dmin:fp16 @2, scales[12] @4 (6-bit sc/m of the 8 sub-blocks, see
put_scale_min_k4 below), qs[128] @16: for each 64 weights, 32 bytes holding weight l in the low nibble
and weight l+32 in the high nibble. Quantization follows quantize_row_q4_K_ref (what ggml_quantize_chunk runs
without an importance matrix): make_qkx2_quants(nmax 15, rmin -1, rdelta 0.1, nstep 20, weights av_x + |x|).

Q5_K: super-blocks of 256 weights in 8 sub-blocks of 32, x = (d*sc)*q - (dmin*m), q in 0..31 (block_q5_K).

Layout (176 bytes, little-endian): d:fp16 @0, dmin:fp16 @2, scales[12] @4 (as Q4_K), qh[32] @16, qs[128] @48.
For the k-th 64 weights (k = 0..3), qs[32k + l] holds the low 4 bits of weight 64k+l (low nibble) and 64k+32+l
(high nibble); bit 2k of qh[l] is bit 4 of weight 64k+l, bit 2k+1 that of weight 64k+32+l. Quantization follows
quantize_row_q5_K_ref: make_qkx2_quants(nmax 31, rmin -0.5, rdelta 0.1, nstep 15, weights av_x + |x|).
"""
import numpy as np
from numba import njit, prange

from qtool.formats.constants import QK_K, GGMLType

from .common import load_fp16, store_fp16
from .kquant_common import (F0, ggml_nearest_int, largest_scale_and_min, n_chunks, qkx2_chunk,
                            requantize)
from .traits import block
from .weighted import kquant_chunk_weighted, make_qp_quants

Q4_K_BYTES = block(GGMLType.Q4_K)[1]
Q5_K_BYTES = block(GGMLType.Q5_K)[1]
# make_qkx2_quants' parameters: (nmax, rmin, nstep); rdelta is 0.1 for both
Q4_K_SEARCH = (15, np.float32(-1.0), 20)
Q5_K_SEARCH = (31, np.float32(-0.5), 15)
RDELTA = np.float32(0.1)


# ---- 6-bit scales and mins of the 8 sub-blocks, packed into 12 bytes (matvec._scale_min_k4 reads the same
# layout from the decode kernels' planes) -------------------------------------------------------------------------
#  bytes 0-3: low 6 bits of scales 0-3, top 2 bits = bits 4-5 of scales 4-7
#  bytes 4-7: low 6 bits of mins 0-3,   top 2 bits = bits 4-5 of mins 4-7
#  bytes 8-11: low nibble = bits 0-3 of scales 4-7, high nibble = bits 0-3 of mins 4-7


@njit(cache=True, inline="always", error_model="numpy")
def put_scale_min_k4(buf, pos: int, j: int, ls: int, lm: int) -> None:
    """Store 6-bit scale ls and min lm of sub-block j in the 12 packed bytes at buf[pos:], in C's order
    (j = 0..7 ascending; sub-blocks 4-7 OR their top bits into bytes sub-blocks 0-7 wrote)."""
    if j < 4:
        buf[pos + j] = ls
        buf[pos + j + 4] = lm
    else:
        buf[pos + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
        buf[pos + j - 4] |= (ls >> 4) << 6
        buf[pos + j] |= (lm >> 4) << 6


@njit(cache=True, inline="always", error_model="numpy")
def get_scale_min_k4(buf, pos: int, j: int):
    """(scale, min) 6-bit values of sub-block j from the 12 packed bytes at buf[pos:]."""
    if j < 4:
        return buf[pos + j] & 63, buf[pos + j + 4] & 63
    sc = (buf[pos + j + 4] & 0xF) | ((buf[pos + j - 4] >> 6) << 4)
    m = (buf[pos + j + 4] >> 4) | ((buf[pos + j] >> 6) << 4)
    return sc, m


@njit(cache=True, error_model="numpy")
def finish_superblock_k4(x, out, pos: int, L, scales, mins, nmax: int) -> None:
    """The rest of quantize_row_q4_K_ref / _q5_K_ref after the sub-block searches: 6-bit scales and mins with
    fp16 super-scales d, dmin at out[pos:pos+16], then the final codes (0..nmax) in L[:256].

    x: the 256 float32 weights; scales, mins: the 8 results of make_qkx2_quants.
    """
    max_scale, max_min = largest_scale_and_min(scales, mins, QK_K // 32)
    inv_scale = np.float32(np.float32(63.0) / max_scale) if max_scale > F0 else F0
    inv_min = np.float32(np.float32(63.0) / max_min) if max_min > F0 else F0
    sp = pos + 4
    for j in range(QK_K // 32):
        ls = ggml_nearest_int(np.float32(inv_scale * scales[j])) & 0xFF  # uint8_t ls = nearest_int(...)
        lm = ggml_nearest_int(np.float32(inv_min * mins[j])) & 0xFF
        put_scale_min_k4(out, sp, j, min(63, ls), min(63, lm))
    d_all = store_fp16(out, pos, np.float32(max_scale / np.float32(63.0)))
    dmin_all = store_fp16(out, pos + 2, np.float32(max_min / np.float32(63.0)))
    for j in range(QK_K // 32):
        sc, m = get_scale_min_k4(out, sp, j)
        d = np.float32(d_all * np.float32(sc))
        if d == F0:
            continue  # keeps make_qkx2_quants' codes, as C does
        dm = np.float32(dmin_all * np.float32(m))
        requantize(x, L, 32 * j, 32, d, dm, nmax)


@njit(cache=True, inline="always", error_model="numpy")
def pack_codes_k4(row, o: int, L, five: bool) -> None:
    """Codes L[:256] into a Q4_K (five=False) or Q5_K block at row[o:]: for each 64 weights, 32 bytes of nibbles
    (weight l low, l+32 high); for Q5_K bit 4 of those two weights in bits 2k, 2k+1 of qh[l]."""
    qs = o + 48 if five else o + 16
    for k in range(4):
        for l in range(32):
            row[qs + 32 * k + l] = (L[64 * k + l] & 0xF) | ((L[64 * k + 32 + l] & 0xF) << 4)
    if five:
        for l in range(32):
            h = 0
            for k in range(4):
                h |= ((L[64 * k + l] >> 4) << (2 * k)) | ((L[64 * k + 32 + l] >> 4) << (2 * k + 1))
            row[o + 16 + l] = h


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_k4(x, out, block_bytes: int, nmax: int, rmin, rdelta, nstep: int, five: bool) -> None:
    """quantize_row_q4_K_ref (five=False) / _q5_K_ref over rows: make_qkx2_quants on the 8 sub-blocks of 32
    (weights av_x + |x|), then finish_superblock_k4 and the codes packed. Parallel over chunks of CHUNK_BLOCKS
    super-blocks, whose sub-blocks are searched together (see make_qkx2_quants_lanes)."""
    nb = x.shape[1] // QK_K
    for c in prange(n_chunks(x)):
        k0, cnt, L, scales, mins = qkx2_chunk(x, c, 8, True, nmax, rmin, rdelta, nstep, False)
        for g in range(cnt):
            r = (k0 + g) // nb
            b = (k0 + g) % nb
            Lb = L[g * QK_K:(g + 1) * QK_K]
            finish_superblock_k4(x[r, b * QK_K:(b + 1) * QK_K], out[r], b * block_bytes, Lb,
                                 scales[8 * g:8 * g + 8], mins[8 * g:8 * g + 8], nmax)
            pack_codes_k4(out[r], b * block_bytes, Lb, five)


@njit(cache=True, inline="always", error_model="numpy")
def dequantize_superblock_k4(q, pos: int, out, o: int, five: bool) -> None:
    """Q4_K (five=False) or Q5_K block at q[pos:] → out[o:o+256]; x = (d*sc)*q - (dmin*m), as gguf-py/ggml."""
    d = load_fp16(q, pos)
    dmin = load_fp16(q, pos + 2)
    sp = pos + 4
    qh = pos + 16
    ql = pos + 48 if five else pos + 16
    for k in range(4):  # 64 weights: sub-blocks 2k (low nibbles) and 2k+1 (high nibbles) of 32 bytes
        sc1, m1 = get_scale_min_k4(q, sp, 2 * k)
        sc2, m2 = get_scale_min_k4(q, sp, 2 * k + 1)
        d1 = np.float32(d * np.float32(sc1))
        dm1 = np.float32(dmin * np.float32(m1))
        d2 = np.float32(d * np.float32(sc2))
        dm2 = np.float32(dmin * np.float32(m2))
        base = o + 64 * k
        for l in range(32):
            b = q[ql + 32 * k + l]
            lo = b & 0xF
            hi = b >> 4
            if five:
                h = q[qh + l]
                lo |= ((h >> (2 * k)) & 1) << 4
                hi |= ((h >> (2 * k + 1)) & 1) << 4
            out[base + l] = np.float32(np.float32(d1 * np.float32(lo)) - dm1)
            out[base + 32 + l] = np.float32(np.float32(d2 * np.float32(hi)) - dm2)


def quantize_q4_k(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q4_K_ref over rows: x float32 (rows, cols) → out uint8 (rows, cols/256*144)."""
    nmax, rmin, nstep = Q4_K_SEARCH
    quantize_k4(x, out, Q4_K_BYTES, nmax, rmin, RDELTA, nstep, False)


def quantize_q5_k(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q5_K_ref over rows: x float32 (rows, cols) → out uint8 (rows, cols/256*176)."""
    nmax, rmin, nstep = Q5_K_SEARCH
    quantize_k4(x, out, Q5_K_BYTES, nmax, rmin, RDELTA, nstep, True)


@njit(parallel=True, cache=True)
def dequantize_q4_k(q: np.ndarray, out: np.ndarray) -> None:
    """dequantize_row_q4_K over rows: q uint8 (rows, cols/256*144) → out float32 (rows, cols)."""
    for r in prange(out.shape[0]):
        for b in range(out.shape[1] // QK_K):
            dequantize_superblock_k4(q[r], b * Q4_K_BYTES, out[r], b * QK_K, False)


@njit(parallel=True, cache=True)
def dequantize_q5_k(q: np.ndarray, out: np.ndarray) -> None:
    """dequantize_row_q5_K over rows: q uint8 (rows, cols/256*176) → out float32 (rows, cols)."""
    for r in prange(out.shape[0]):
        for b in range(out.shape[1] // QK_K):
            dequantize_superblock_k4(q[r], b * Q5_K_BYTES, out[r], b * QK_K, True)


# ---- with an importance matrix: quantize_row_q4_K_impl / _q5_K_impl -----------------------------------------------
# Per super-block sigma2 = 2*mean x^2; sub-block j's weights qw*sqrtf(sigma2 + x^2) drive make_qkx3_quants (rmin
# -0.9, rdelta 0.05, 36 steps; weighted.kquant_chunk_weighted, many sub-blocks at once); the 8 scales and 8 mins
# are quantized to 6 bits by make_qp_quants (nmax 63) weighted by the sub-blocks' sums of weights (Q5_K clamps
# the codes to 63, Q4_K stores them as they are).

@njit(cache=True, error_model="numpy")
def finish_superblock_k4_weighted(x, out, pos: int, L, scales, mins, sw, ls, lm, nmax: int, five: bool) -> None:
    d_block = make_qp_quants(QK_K // 32, 63, scales, ls, sw)
    m_block = make_qp_quants(QK_K // 32, 63, mins, lm, sw)
    sp = pos + 4
    for j in range(QK_K // 32):
        a = np.int64(ls[j])
        b = np.int64(lm[j])
        if five:
            a = min(63, a)
            b = min(63, b)
        put_scale_min_k4(out, sp, j, a, b)
    d_all = store_fp16(out, pos, d_block)
    dmin_all = store_fp16(out, pos + 2, m_block)
    for j in range(QK_K // 32):
        sc, m = get_scale_min_k4(out, sp, j)
        d = np.float32(d_all * np.float32(sc))
        if d == F0:
            continue
        dm = np.float32(dmin_all * np.float32(m))
        requantize(x, L, 32 * j, 32, d, dm, nmax)
    pack_codes_k4(out, pos, L, five)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_k4_weighted(x, out, qw, block_bytes: int, nmax: int, five: bool) -> None:
    """quantize_row_q4_K_impl (five=False) / _q5_K_impl over rows, parallel over chunks of CHUNK_BLOCKS
    super-blocks."""
    nb = x.shape[1] // QK_K
    for c in prange(n_chunks(x)):
        k0, cnt, L, scales, mins, sw = kquant_chunk_weighted(x, qw, c, 8, nmax, True)
        ls = np.empty(8, dtype=np.uint8)
        lm = np.empty(8, dtype=np.uint8)
        for g in range(cnt):
            r = (k0 + g) // nb
            b = (k0 + g) % nb
            finish_superblock_k4_weighted(x[r, b * QK_K:(b + 1) * QK_K], out[r], b * block_bytes,
                                          L[g * QK_K:(g + 1) * QK_K], scales[8 * g:8 * g + 8], mins[8 * g:8 * g + 8],
                                          sw[8 * g:8 * g + 8], ls, lm, nmax, five)


def quantize_q4_k_weighted(x: np.ndarray, out: np.ndarray, qw: np.ndarray) -> None:
    """quantize_row_q4_K_impl over rows: x float32 (rows, cols), qw float32 (cols,)."""
    quantize_k4_weighted(x, out, qw, Q4_K_BYTES, 15, False)


def quantize_q5_k_weighted(x: np.ndarray, out: np.ndarray, qw: np.ndarray) -> None:
    """quantize_row_q5_K_impl over rows: x float32 (rows, cols), qw float32 (cols,)."""
    quantize_k4_weighted(x, out, qw, Q5_K_BYTES, 31, True)
