"""Q2_K: super-blocks of 256 weights in 16 sub-blocks of 16, x = (d*sc)*q - (dmin*m), q in 0..3 (block_q2_K).

Layout (84 bytes, little-endian): scales[16] @0 (sub-block j: 4-bit scale in the low nibble, 4-bit min in the
high nibble), qs[64] @16, d:fp16 @80, dmin:fp16 @82. For each half h of 128 weights, qs[32h + l] holds weights
128h + l, +32, +64, +96 in bits 0-1, 2-3, 4-5, 6-7. Quantization follows quantize_row_q2_K_ref:
make_qkx2_quants(nmax 3, rmin -0.5, rdelta 0.1, nstep 15, weights |x|, absolute-error criterion).
"""
import numpy as np
from numba import njit, prange

from .common import load_fp16, store_fp16
from .kquant_common import CHUNK_BLOCKS, F0, QK_K, QKX2_STATE, ggml_nearest_int, qkx2_search, requantize

BLOCK_BYTES = 84
NSTEP = 15


@njit(cache=True, error_model="numpy")
def finish_superblock(x, out, pos: int, L, scales, mins) -> None:
    """The rest of quantize_row_q2_K_ref after the 16 sub-block searches (scales, mins, codes L): 4-bit scales
    and mins with fp16 d, dmin, the final codes, packed into out[pos:pos+84]. x: the 256 float32 weights."""
    q4scale = np.float32(15.0)
    max_scale = F0
    max_min = F0
    for j in range(QK_K // 16):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    if max_scale > F0:
        iscale = np.float32(q4scale / max_scale)
        for j in range(QK_K // 16):
            out[pos + j] = ggml_nearest_int(np.float32(iscale * scales[j])) & 0xFF
        d_all = store_fp16(out, pos + 80, np.float32(max_scale / q4scale))
    else:
        for j in range(QK_K // 16):
            out[pos + j] = 0
        d_all = store_fp16(out, pos + 80, F0)
    if max_min > F0:
        iscale = np.float32(q4scale / max_min)
        for j in range(QK_K // 16):
            out[pos + j] |= (ggml_nearest_int(np.float32(iscale * mins[j])) << 4) & 0xFF
        dmin_all = store_fp16(out, pos + 82, np.float32(max_min / q4scale))
    else:
        dmin_all = store_fp16(out, pos + 82, F0)
    for j in range(QK_K // 16):
        s = out[pos + j]
        d = np.float32(d_all * np.float32(s & 0xF))
        if d == F0:
            continue  # keeps make_qkx2_quants' codes, as C does
        dm = np.float32(dmin_all * np.float32(s >> 4))
        requantize(x, L, 16 * j, 16, d, dm, 3)
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            out[pos + 16 + 32 * h + l] = L[b] | (L[b + 32] << 2) | (L[b + 64] << 4) | (L[b + 96] << 6)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q2_K_ref over rows: x float32 (rows, cols) → out uint8 (rows, cols/256*84).

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
        scales = np.empty(cnt * 16, dtype=np.float32)
        mins = np.empty(cnt * 16, dtype=np.float32)
        work = np.empty((4, 16, cnt * 16), dtype=np.float32)
        st = np.empty((QKX2_STATE, cnt * 16), dtype=np.float32)
        qkx2_search(x, k0, cnt, 16, 16, False, 3, rmin, rdelta, NSTEP, True, L, scales, mins, work, st)
        for g in range(cnt):
            k = k0 + g
            r = k // nb
            b = k % nb
            finish_superblock(x[r, b * QK_K:(b + 1) * QK_K], out[r], b * BLOCK_BYTES, L[g * QK_K:(g + 1) * QK_K],
                              scales[16 * g:16 * g + 16], mins[16 * g:16 * g + 16])


@njit(parallel=True, cache=True)
def dequantize(q: np.ndarray, out: np.ndarray) -> None:
    """dequantize_row_q2_K over rows: q uint8 (rows, cols/256*84) → out float32 (rows, cols)."""
    n_rows, n_cols = out.shape
    for r in prange(n_rows):
        qr = q[r]
        orow = out[r]
        for b in range(n_cols // QK_K):
            pos = b * BLOCK_BYTES
            o = b * QK_K
            d = load_fp16(qr, pos + 80)
            dmin = load_fp16(qr, pos + 82)
            for h in range(2):
                for k in range(4):
                    for half in range(2):
                        s = qr[pos + 8 * h + 2 * k + half]
                        dl = np.float32(d * np.float32(s & 0xF))
                        ml = np.float32(dmin * np.float32(s >> 4))
                        qb = pos + 16 + 32 * h + 16 * half
                        ob = o + 128 * h + 32 * k + 16 * half
                        for l in range(16):
                            v = (qr[qb + l] >> (2 * k)) & 3
                            orow[ob + l] = np.float32(np.float32(dl * np.float32(v)) - ml)
