"""Q2_K: super-blocks of 256 weights in 16 sub-blocks of 16, x = (d*sc)*q - (dmin*m), q in 0..3 (block_q2_K).

Layout (84 bytes, little-endian): scales[16] @0 (sub-block j: 4-bit scale in the low nibble, 4-bit min in the
high nibble), qs[64] @16, d:fp16 @80, dmin:fp16 @82. For each half h of 128 weights, qs[32h + l] holds weights
128h + l, +32, +64, +96 in bits 0-1, 2-3, 4-5, 6-7. Quantization follows quantize_row_q2_K_ref:
make_qkx2_quants(nmax 3, rmin -0.5, rdelta 0.1, nstep 15, weights |x|, absolute-error criterion).
"""
import numpy as np
from numba import njit, prange

from qtool.formats.constants import GGMLType

from .common import load_fp16, store_fp16
from .kquant_common import (F0, QK_K, ggml_nearest_int, largest_scale_and_min, n_chunks, qkx2_chunk,
                            requantize)
from .traits import block, fields
from .weighted import kquant_chunk_weighted, make_qp_quants

BLOCK_BYTES = block(GGMLType.Q2_K)[1]
SCALES, QS, D, DMIN = fields(GGMLType.Q2_K, "scales", "qs", "d", "dmin")
NSTEP = 15
RMIN = np.float32(-0.5)
RDELTA = np.float32(0.1)


@njit(cache=True, inline="always", error_model="numpy")
def _requantize_pack(x, out, pos: int, L, d_all, dmin_all) -> None:
    """The end of quantize_row_q2_K_ref and _impl, once the 4-bit scales and mins are in out[pos:pos+16]: each
    weight of x[:256] requantized against them (a sub-block whose scale is 0 keeps the search's codes, as C
    does), the codes L packed into out[pos+QS:]."""
    for j in range(QK_K // 16):
        s = np.int32(out[pos + SCALES + j])
        d = np.float32(d_all * np.float32(s & 0xF))
        if d == F0:
            continue
        dm = np.float32(dmin_all * np.float32(s >> 4))
        requantize(x, L, 16 * j, 16, d, dm, 3)
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            out[pos + QS + 32 * h + l] = L[b] | (L[b + 32] << 2) | (L[b + 64] << 4) | (L[b + 96] << 6)


@njit(cache=True, error_model="numpy")
def finish_superblock(x, out, pos: int, L, scales, mins) -> None:
    """The rest of quantize_row_q2_K_ref after the 16 sub-block searches (scales, mins, codes L): 4-bit scales
    and mins with fp16 d, dmin, the final codes, packed into out[pos:pos+84]. x: the 256 float32 weights."""
    q4scale = np.float32(15.0)
    max_scale, max_min = largest_scale_and_min(scales, mins, QK_K // 16)
    if max_scale > F0:
        iscale = np.float32(q4scale / max_scale)
        for j in range(QK_K // 16):
            out[pos + j] = ggml_nearest_int(np.float32(iscale * scales[j])) & 0xFF
        d_all = store_fp16(out, pos + D, np.float32(max_scale / q4scale))
    else:
        for j in range(QK_K // 16):
            out[pos + j] = 0
        d_all = store_fp16(out, pos + D, F0)
    if max_min > F0:
        iscale = np.float32(q4scale / max_min)
        for j in range(QK_K // 16):
            out[pos + j] |= (ggml_nearest_int(np.float32(iscale * mins[j])) << 4) & 0xFF
        dmin_all = store_fp16(out, pos + DMIN, np.float32(max_min / q4scale))
    else:
        dmin_all = store_fp16(out, pos + DMIN, F0)
    _requantize_pack(x, out, pos, L, d_all, dmin_all)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q2_K_ref over rows: x float32 (rows, cols) → out uint8 (rows, cols/256*84).

    Parallel over chunks of CHUNK_BLOCKS super-blocks (counted row after row), whose sub-blocks are searched
    together (see kquant_common.make_qkx2_quants_lanes).
    """
    nb = x.shape[1] // QK_K
    for c in prange(n_chunks(x)):
        k0, cnt, L, scales, mins = qkx2_chunk(x, c, 16, False, 3, RMIN, RDELTA, NSTEP, True)
        for g in range(cnt):
            r = (k0 + g) // nb
            b = (k0 + g) % nb
            finish_superblock(x[r, b * QK_K:(b + 1) * QK_K], out[r], b * BLOCK_BYTES, L[g * QK_K:(g + 1) * QK_K],
                              scales[16 * g:16 * g + 16], mins[16 * g:16 * g + 16])


@njit(cache=True, inline="always")
def dequantize_block(row, o: int, y, yo: int) -> None:
    """The block at row[o:] → y[yo:yo+256]: x = (d*sc)*q - (dmin*m), as gguf-py and ggml."""
    d = load_fp16(row, o + D)
    dmin = load_fp16(row, o + DMIN)
    for h in range(2):
        for k in range(4):
            for half in range(2):
                s = row[o + SCALES + 8 * h + 2 * k + half]
                dl = np.float32(d * np.float32(s & 0xF))
                ml = np.float32(dmin * np.float32(s >> 4))
                qb = o + QS + 32 * h + 16 * half
                ob = yo + 128 * h + 32 * k + 16 * half
                for l in range(16):
                    v = (row[qb + l] >> (2 * k)) & 3
                    y[ob + l] = np.float32(np.float32(dl * np.float32(v)) - ml)


@njit(parallel=True, cache=True)
def dequantize(q: np.ndarray, out: np.ndarray) -> None:
    """dequantize_row_q2_K over rows: q uint8 (rows, cols/256*84) → out float32 (rows, cols)."""
    for r in prange(out.shape[0]):
        for b in range(out.shape[1] // QK_K):
            dequantize_block(q[r], b * BLOCK_BYTES, out[r], b * QK_K)


# ---- with an importance matrix: quantize_row_q2_K_impl -------------------------------------------------------------
# Per super-block sigma2 = mean x^2 of its 256 weights; sub-block j's weights qw*sqrtf(sigma2 + x^2) drive
# make_qkx3_quants (nmax 3, rmin -0.9, rdelta 0.05, 36 steps; weighted.kquant_chunk_weighted, many sub-blocks at
# once); the 16 scales and 16 mins are quantized to 4 bits by make_qp_quants, weighted by each sub-block's sum of
# weights; then every weight is requantized.

@njit(cache=True, error_model="numpy")
def finish_superblock_weighted(x, out, pos: int, L, scales, mins, sw, ls, lm) -> None:
    """The rest of quantize_row_q2_K_impl after the sub-block searches, into out[pos:pos+84]."""
    dm = make_qp_quants(QK_K // 16, 15, scales, ls, sw)
    mm = make_qp_quants(QK_K // 16, 15, mins, lm, sw)
    dm = store_fp16(out, pos + D, dm)
    mm = store_fp16(out, pos + DMIN, mm)
    for j in range(QK_K // 16):
        out[pos + SCALES + j] = (np.int32(ls[j]) | (np.int32(lm[j]) << 4)) & 0xFF
    _requantize_pack(x, out, pos, L, dm, mm)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_weighted(x: np.ndarray, out: np.ndarray, qw: np.ndarray) -> None:
    """quantize_row_q2_K_impl over rows (x float32 (rows, cols), qw float32 (cols,)), parallel over chunks of
    CHUNK_BLOCKS super-blocks."""
    nb = x.shape[1] // QK_K
    for c in prange(n_chunks(x)):
        k0, cnt, L, scales, mins, sw = kquant_chunk_weighted(x, qw, c, 16, 3, False)
        ls = np.empty(16, dtype=np.uint8)
        lm = np.empty(16, dtype=np.uint8)
        for g in range(cnt):
            r = (k0 + g) // nb
            b = (k0 + g) % nb
            finish_superblock_weighted(x[r, b * QK_K:(b + 1) * QK_K], out[r], b * BLOCK_BYTES,
                                       L[g * QK_K:(g + 1) * QK_K], scales[16 * g:16 * g + 16],
                                       mins[16 * g:16 * g + 16], sw[16 * g:16 * g + 16], ls, lm)
