"""Q5_K: super-blocks of 256 weights in 8 sub-blocks of 32, x = (d*sc)*q - (dmin*m), q in 0..31 (block_q5_K).

Layout (176 bytes, little-endian): d:fp16 @0, dmin:fp16 @2, scales[12] @4 (as Q4_K), qh[32] @16, qs[128] @48.
For the k-th 64 weights (k = 0..3), qs[32k + l] holds the low 4 bits of weight 64k+l (low nibble) and 64k+32+l
(high nibble); bit 2k of qh[l] is bit 4 of weight 64k+l, bit 2k+1 that of weight 64k+32+l. Quantization follows
quantize_row_q5_K_ref: make_qkx2_quants(nmax 31, rmin -0.5, rdelta 0.1, nstep 15, weights av_x + |x|).
"""
import numpy as np
from numba import njit, prange

from .kquant_common import (CHUNK_BLOCKS, QK_K, QKX2_STATE, dequantize_superblock_k4, finish_superblock_k4,
                            qkx2_search)

BLOCK_BYTES = 176
NMAX = 31
NSTEP = 15


@njit(parallel=True, cache=True, error_model="numpy")
def quantize(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q5_K_ref over rows: x float32 (rows, cols) → out uint8 (rows, cols/256*176).

    Parallel over chunks of CHUNK_BLOCKS super-blocks (counted row after row), whose sub-blocks are searched
    together (see kquant_common.make_qkx2_quants_lanes).
    """
    n_rows, n_cols = x.shape
    nb = n_cols // QK_K
    total = n_rows * nb
    rmin = np.float32(-0.5)
    rdelta = np.float32(0.1)
    for c in prange((total + CHUNK_BLOCKS - 1) // CHUNK_BLOCKS):
        k0 = c * CHUNK_BLOCKS
        cnt = min(CHUNK_BLOCKS, total - k0)
        L = np.empty(cnt * QK_K, dtype=np.uint8)
        scales = np.empty(cnt * 8, dtype=np.float32)
        mins = np.empty(cnt * 8, dtype=np.float32)
        work = np.empty((4, 32, cnt * 8), dtype=np.float32)
        st = np.empty((QKX2_STATE, cnt * 8), dtype=np.float32)
        qkx2_search(x, k0, cnt, 8, 32, True, NMAX, rmin, rdelta, NSTEP, False, L, scales, mins, work, st)
        for g in range(cnt):
            k = k0 + g
            r = k // nb
            b = k % nb
            row = out[r]
            o = b * BLOCK_BYTES
            Lb = L[g * QK_K:(g + 1) * QK_K]
            finish_superblock_k4(x[r, b * QK_K:(b + 1) * QK_K], row, o, Lb, scales[8 * g:8 * g + 8],
                                 mins[8 * g:8 * g + 8], NMAX)
            for l in range(32):
                h = 0
                for q in range(4):
                    l1 = Lb[64 * q + l]
                    l2 = Lb[64 * q + 32 + l]
                    h |= ((l1 >> 4) << (2 * q)) | ((l2 >> 4) << (2 * q + 1))
                    row[o + 48 + 32 * q + l] = (l1 & 0xF) | ((l2 & 0xF) << 4)
                row[o + 16 + l] = h


@njit(parallel=True, cache=True)
def dequantize(q: np.ndarray, out: np.ndarray) -> None:
    """dequantize_row_q5_K over rows: q uint8 (rows, cols/256*176) → out float32 (rows, cols)."""
    n_rows, n_cols = out.shape
    for r in prange(n_rows):
        for b in range(n_cols // QK_K):
            dequantize_superblock_k4(q[r], b * BLOCK_BYTES, out[r], b * QK_K, True)
