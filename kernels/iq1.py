"""IQ1_S: 256-weight super-blocks of 8 blocks of 32, each group of 8 weights an entry of iq1s_grid (2048 points
of -1/0/1), shifted by +-IQ1S_DELTA per block: x = d * (2s+1) * (grid[j] + delta) (block_iq1_s).

Layout (50 bytes, little-endian): d:fp16 @0, qs @2: the low 8 bits of the 32 grid indices, qh @34: a uint16 per
32 weights, the indices' top 3 bits (bits 3l..3l+2 for group l), the 3-bit scale s (bits 12-14), the delta's
sign (bit 15: -delta).

Quantization is llama.cpp's quantize_row_iq1_s_impl (with an imatrix only, as ggml_quantize_requires_imatrix):
per block the weights sorted by value (glibc's qsort on 32 elements, a stable merge sort, reproduced here), the
exhaustive search of the two split points into levels -1/0/1 for both signs of delta, the groups snapped to the
grid or to their best neighbour (iq2.neighbour_tables on the iq1s grid, 3 distances), a final least-squares
scale, the scales to 3 bits against max/15 (d stored * 1.125). Float32 in C's order, no fused multiply-add.
"""
import numpy as np
from numba import njit, prange

from qtool.formats.constants import GGMLType

from .common import fp16_value, h2f, load_fp16, store_fp16
from .iq2 import grid_levels, neighbour_tables
from .iq_grids import iq1s_grid
from .kquant_common import F0, F1, QK_K, ggml_nearest_int
from .matvec import ACC0, ONE, _acc, _f16, _put
from .traits import block, fields
from .weighted import sigma2_weights, twice_mean_square

S_BYTES = block(GGMLType.IQ1_S)[1]
S_D, S_QS, S_QH = fields(GGMLType.IQ1_S, "d", "qs", "qh")
DELTA = np.float32(0.125)
GROUP_MAX_EPS_IQ1_S = np.float32(1e-12)
FLT_MAX = np.float32(3.4028234663852886e38)
HALF = np.float32(0.5)
X_P = np.array([-1 + 0.125, 0.125, 1 + 0.125], np.float32)  # levels 0, 1, 2 with +delta
X_M = np.array([-1 - 0.125, -0.125, 1 - 0.125], np.float32)
CHUNK = 16


def _tables():
    return neighbour_tables("IQ1", grid_levels(iq1s_grid, (-1, 0, 1)), 3)


@njit(cache=True, inline="always", error_model="numpy")
def _merge_sort(keys, order, tmp) -> None:
    """glibc's qsort on 32 (key, index) pairs with iq1_sort_helper (key < key: -1, > : 1, else 0): msort, a
    top-down merge sort taking the left element unless it compares greater; for 32 elements its halves are
    the bottom-up widths 1, 2, 4, 8, 16. order: the indices, sorted in place."""
    n = order.shape[0]
    width = 1
    while width < n:
        for lo in range(0, n, 2 * width):
            mid = lo + width
            hi = lo + 2 * width
            i = lo
            j = mid
            k = lo
            while i < mid and j < hi:
                if keys[order[i]] > keys[order[j]]:
                    tmp[k] = order[j]
                    j += 1
                else:
                    tmp[k] = order[i]
                    i += 1
                k += 1
            while i < mid:
                tmp[k] = order[i]
                i += 1
                k += 1
            while j < hi:
                tmp[k] = order[j]
                j += 1
                k += 1
        for i in range(n):
            order[i] = tmp[i]
        width *= 2


@njit(cache=True, inline="always", error_model="numpy")
def _best_neighbour2(neighbours, o: int, kgrid, xb, xo: int, weight, scale, xx, L, lo: int) -> int:
    # weight and L are the block's own (offset lo), xb the super-block's (offset xo)
    """iq1_find_best_neighbour2 on its neighbour list; -1 where none compares below FLT_MAX (C then scans the
    whole grid reading past its 8 values: undefined, and only with inf or NaN)."""
    best = FLT_MAX
    gi = -1
    for j in range(1, np.int64(neighbours[o]) + 1):
        g = np.int64(neighbours[o + j])
        d2 = F0
        for i in range(8):
            q = xx[kgrid[g, i] >> 1]
            diff = np.float32(np.float32(scale * q) - xb[xo + i])
            d2 = np.float32(d2 + np.float32(np.float32(weight[lo + i] * diff) * diff))
        if d2 < best:
            best = d2
            gi = g
    if gi >= 0:
        for i in range(8):
            L[lo + i] = kgrid[gi, i] >> 1
    return gi


@njit(cache=True, error_model="numpy")
def _iq1s_block(xb, qw, wo: int, out, pos: int, kgrid, kmap, neighbours, weight, L, order, tmp, sumx, sumw,
                scales, shifts, index) -> None:
    """quantize_row_iq1_s_impl on one super-block xb[:256] into out[pos:pos+50]."""
    for i in range(S_BYTES):
        out[pos + i] = 0
    max_scale = F0
    sigma2 = twice_mean_square(xb, 0, QK_K)
    for ib in range(QK_K // 32):
        o = 32 * ib
        sigma2_weights(xb, o, 32, sigma2, qw, wo + o, weight)
        mx = abs(xb[o])
        for i in range(1, 32):
            a = abs(xb[o + i])
            mx = mx if mx > a else a
        if mx < GROUP_MAX_EPS_IQ1_S:
            scales[ib] = F0
            shifts[ib] = 1
            continue
        for j in range(32):
            order[j] = j
        _merge_sort(xb[o:o + 32], order, tmp)
        sumx[0] = F0
        sumw[0] = F0
        for j in range(32):
            i = order[j]
            sumx[j + 1] = np.float32(sumx[j] + np.float32(weight[i] * xb[o + i]))
            sumw[j + 1] = np.float32(sumw[j] + weight[i])
        best_score = -FLT_MAX
        scale = mx
        besti1 = -1
        besti2 = -1
        best_shift = 0
        for i1 in range(33):
            for i2 in range(i1, 33):
                a = np.float32(sumx[i1] - sumx[0])
                b = np.float32(sumx[i2] - sumx[i1])
                c = np.float32(sumx[32] - sumx[i2])
                wa = np.float32(sumw[i1] - sumw[0])
                wb = np.float32(sumw[i2] - sumw[i1])
                wc = np.float32(sumw[32] - sumw[i2])
                for sh in range(2):
                    xx = X_P if sh == 0 else X_M
                    sumqx = np.float32(np.float32(np.float32(a * xx[0]) + np.float32(b * xx[1]))
                                       + np.float32(c * xx[2]))
                    sumq2 = np.float32(np.float32(np.float32(np.float32(wa * xx[0]) * xx[0])
                                                  + np.float32(np.float32(wb * xx[1]) * xx[1]))
                                       + np.float32(np.float32(wc * xx[2]) * xx[2]))
                    if sumq2 > F0 and np.float32(sumqx * sumqx) > np.float32(best_score * sumq2):
                        scale = np.float32(sumqx / sumq2)
                        best_score = np.float32(scale * sumqx)
                        besti1 = i1
                        besti2 = i2
                        best_shift = 1 if sh == 0 else -1
        if besti1 < 0 or besti2 < 0 or best_shift == 0:
            scales[ib] = F0
            shifts[ib] = 1
            continue
        for j in range(32):
            L[order[j]] = 0 if j < besti1 else (1 if j < besti2 else 2)
        if scale < F0:
            for j in range(32):
                L[j] = 2 - L[j]
            scale = -scale
            best_shift = -best_shift
        xx = X_P if best_shift == 1 else X_M
        all_on_grid = True
        for k in range(4):
            u = 0
            for j in range(8):
                u |= np.int64(L[8 * k + j]) << (2 * j)
            g = kmap[u]
            if g < 0:
                all_on_grid = False
                g = max(_best_neighbour2(neighbours, -g - 1, kgrid, xb, o + 8 * k, weight, scale, xx, L, 8 * k),
                        0)  # C asserts (after its out-of-bounds scan) where none is found
            index[k] = g
        if not all_on_grid:
            sumqx = F0
            sumq2 = F0
            for k in range(4):
                for j in range(8):
                    w = weight[8 * k + j]
                    q = xx[kgrid[index[k], j] >> 1]
                    sumqx = np.float32(sumqx + np.float32(np.float32(w * q) * xb[o + 8 * k + j]))
                    sumq2 = np.float32(sumq2 + np.float32(np.float32(w * q) * q))
            if sumqx > F0 and sumq2 > F0:
                scale = np.float32(sumqx / sumq2)
        h = 0
        for k in range(4):
            out[pos + S_QS + 4 * ib + k] = index[k] & 255
            h |= (index[k] >> 8) << (3 * k)
        out[pos + S_QH + 2 * ib] = h & 0xFF
        out[pos + S_QH + 2 * ib + 1] = (h >> 8) & 0xFF
        scales[ib] = scale
        shifts[ib] = best_shift
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == F0:
        return
    d = np.float32(max_scale / np.float32(15.0))
    store_fp16(out, pos + S_D, np.float32(d * np.float32(1.125)))
    id_ = np.float32(F1 / d)
    for ib in range(QK_K // 32):
        l = ggml_nearest_int(np.float32(HALF * np.float32(np.float32(id_ * scales[ib]) - F1)))
        l = 0 if l < 0 else (7 if l > 7 else l)
        if shifts[ib] == -1:
            l |= 8
        out[pos + S_QH + 2 * ib + 1] |= (l << 4) & 0xFF


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_rows(x, out, qw, kgrid, kmap, neighbours) -> None:
    nb = x.shape[1] // QK_K
    total = x.shape[0] * nb
    for c in prange((total + CHUNK - 1) // CHUNK):
        weight = np.empty(32, np.float32)
        L = np.zeros(32, np.int8)
        order = np.empty(32, np.int64)
        tmp = np.empty(32, np.int64)
        sumx = np.empty(33, np.float32)
        sumw = np.empty(33, np.float32)
        scales = np.empty(8, np.float32)
        shifts = np.empty(8, np.int64)
        index = np.empty(4, np.int64)
        for k in range(c * CHUNK, min(total, (c + 1) * CHUNK)):
            r = k // nb
            b = k % nb
            _iq1s_block(x[r, b * QK_K:(b + 1) * QK_K], qw, b * QK_K, out[r], b * S_BYTES, kgrid, kmap, neighbours,
                        weight, L, order, tmp, sumx, sumw, scales, shifts, index)


def quantize_iq1_s_weighted(x: np.ndarray, out: np.ndarray, qw: np.ndarray) -> None:
    """quantize_iq1_s (ggml_quantize_chunk with an imatrix; llama.cpp has no IQ1_S without one)."""
    _quantize_rows(x, out, qw, *_tables())


def quantize_refused(x: np.ndarray, out: np.ndarray) -> None:
    """Never reached: traits refuses IQ1_S without an imatrix."""
    raise ValueError("needs an importance matrix")


@njit(parallel=True, cache=True)
def dequantize_iq1_s(q: np.ndarray, out: np.ndarray) -> None:
    """dequantize_row_iq1_s: x = (d * (2s+1)) * (grid[j] + delta), as gguf-py."""
    for r in prange(out.shape[0]):
        row = q[r]
        for b in range(out.shape[1] // QK_K):
            o = b * S_BYTES
            d = load_fp16(row, o + S_D)
            for ib in range(8):
                qh = np.int64(row[o + S_QH + 2 * ib]) | (np.int64(row[o + S_QH + 2 * ib + 1]) << 8)
                dl = np.float32(d * np.float32(2 * ((qh >> 12) & 7) + 1))
                delta = -DELTA if qh & 0x8000 else DELTA
                for l in range(4):
                    g = np.int64(row[o + S_QS + 4 * ib + l]) | (((qh >> (3 * l)) & 7) << 8)
                    for j in range(8):
                        out[r, b * QK_K + 32 * ib + 8 * l + j] = np.float32(
                            dl * np.float32(np.float32(iq1s_grid[g, j]) + delta))


# ---- fused decode kernel: w planes (N, 50, lanes); xq (T, 256, lanes) int16; xd (T, lanes); xb (T, 16, lanes) --
GRID64 = np.ascontiguousarray(iq1s_grid).view(np.uint64).reshape(-1)


@njit(parallel=True, cache=True, fastmath=True)
def mv_iq1_s(w, xq, xd, xb, seg, group, out):
    """ggml_vec_dot_iq1_s_q8_K: per block of 32, (2s+1) * (sum grid*codes + delta*8 * sum codes), delta = +-1/8."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                sumi = np.float32(0.0)
                sumi1 = np.float32(0.0)
                for ib in range(8):
                    qh = np.int32(w[r, S_QH + 2 * ib, b]) | (np.int32(w[r, S_QH + 2 * ib + 1, b]) << 8)
                    s = np.int32(0)
                    for l in range(4):
                        g = GRID64[np.int32(w[r, S_QS + 4 * ib + l, b]) | (((qh >> (3 * l)) & 7) << 8)]
                        for j in range(8):
                            v = np.int32(np.int8(np.uint8((g >> np.uint64(8 * j)) & np.uint64(0xFF))))
                            s = np.int32(s + v * np.int32(xq[t, 32 * ib + 8 * l + j, b]))
                    ls = np.float32(2 * ((qh >> 12) & 7) + 1)
                    sign = np.float32(-1.0) if qh & 0x8000 else np.float32(1.0)
                    sumi += ls * np.float32(s)
                    sumi1 += ls * sign * (xb[t, 2 * ib, b] + xb[t, 2 * ib + 1, b])
                acc = _acc(acc, seg[b], xd[t, b] * _f16(w, r, S_D, b) * (sumi + DELTA * sumi1))
            _put(out, t, r, group, acc, ONE)


# ---- IQ1_M: 16-weight blocks, a delta sign per 8 (qh bits 3 and 7), 3-bit scales; d (fp16) in the top nibbles
# of the four uint16 of scales. Layout (56 bytes): qs[32] @0 (low index bits), qh[16] @32 (per 16 weights: index
# top bits of its two groups in bits 0-2 and 4-6, their delta signs in bits 3 and 7), scales[8] @48 as 4 uint16:
# scale of block ib in bits 3*(ib%4) of uint16 ib/4, d's fp16 nibble k in bits 12-15 of uint16 k.
M_BYTES = block(GGMLType.IQ1_M)[1]
M_QS, M_QH, M_SCALES = fields(GGMLType.IQ1_M, "qs", "qh", "scales")
GROUP_MAX_EPS_IQ1_M = np.float32(1e-7)
MASKS = np.array([0x00, 0x80, 0x08, 0x88], np.int64)  # best_k 0: +,+  1: +,-  2: -,+  3: -,-


@njit(cache=True, inline="always", error_model="numpy")
def _m_weights(xb, o: int, has_qw: bool, sigma2, qw, wo: int, weight) -> None:
    if has_qw:
        sigma2_weights(xb, o, 16, sigma2, qw, wo, weight)
    else:
        for i in range(16):
            v = xb[o + i]
            weight[i] = np.float32(v * v)


@njit(cache=True, inline="always", error_model="numpy")
def _m_shift(k: int, best_k: int):
    return (X_P if best_k < 2 else X_M) if k == 0 else (X_P if best_k % 2 == 0 else X_M)


@njit(cache=True, error_model="numpy")
def _iq1m_block(xb, qw, wo: int, has_qw: bool, out, pos: int, kgrid, kmap, neighbours, weight, L, order, tmp,
                px, pw, scales, shifts, index) -> None:
    """quantize_row_iq1_m_impl on one super-block xb[:256] into out[pos:pos+56]."""
    for i in range(M_BYTES):
        out[pos + i] = 0
    max_scale = F0
    sigma2 = twice_mean_square(xb, 0, QK_K)
    p2 = X_P[2]
    m2 = X_M[2]
    cp1 = np.float32(np.float32(X_P[0] * X_P[0]) - np.float32(X_P[1] * X_P[1]))
    cp2 = np.float32(np.float32(X_P[1] * X_P[1]) - np.float32(X_P[2] * X_P[2]))
    cm1 = np.float32(np.float32(X_M[0] * X_M[0]) - np.float32(X_M[1] * X_M[1]))
    cm2 = np.float32(np.float32(X_M[1] * X_M[1]) - np.float32(X_M[2] * X_M[2]))
    sqx = np.empty(4, np.float32)
    sq2 = np.empty(4, np.float32)
    for ib in range(QK_K // 16):
        o = 16 * ib
        _m_weights(xb, o, has_qw, sigma2, qw, wo + o, weight)
        mx = abs(xb[o])
        for i in range(1, 16):
            a = abs(xb[o + i])
            mx = mx if mx > a else a
        if mx < GROUP_MAX_EPS_IQ1_M:
            scales[ib] = F0
            shifts[ib] = 0
            continue
        for j in range(16):
            order[j] = j
        _merge_sort(xb[o:o + 16], order, tmp)
        best_score = -FLT_MAX
        scale = mx
        besti1 = -1
        besti2 = -1
        best_k = -1
        px[0, 0] = F0
        px[1, 0] = F0
        pw[0, 0] = F0
        pw[1, 0] = F0
        for j in range(16):
            i = order[j]
            h = 0 if i < 8 else 1
            px[h, j + 1] = np.float32(px[h, j] + np.float32(weight[i] * xb[o + i]))
            px[1 - h, j + 1] = px[1 - h, j]
            pw[h, j + 1] = np.float32(pw[h, j] + weight[i])
            pw[1 - h, j + 1] = pw[1 - h, j]
        for i1 in range(17):
            for i2 in range(i1, 17):
                sx0 = np.float32(px[0, i1] + px[0, i2])
                sx1 = np.float32(px[1, i1] + px[1, i2])
                qxp0 = np.float32(np.float32(px[0, 16] * p2) - sx0)
                qxp1 = np.float32(np.float32(px[1, 16] * p2) - sx1)
                qxm0 = np.float32(np.float32(px[0, 16] * m2) - sx0)
                qxm1 = np.float32(np.float32(px[1, 16] * m2) - sx1)
                q2p0 = np.float32(np.float32(np.float32(np.float32(pw[0, 16] * p2) * p2)
                                             + np.float32(pw[0, i1] * cp1)) + np.float32(pw[0, i2] * cp2))
                q2p1 = np.float32(np.float32(np.float32(np.float32(pw[1, 16] * p2) * p2)
                                             + np.float32(pw[1, i1] * cp1)) + np.float32(pw[1, i2] * cp2))
                q2m0 = np.float32(np.float32(np.float32(np.float32(pw[0, 16] * m2) * m2)
                                             + np.float32(pw[0, i1] * cm1)) + np.float32(pw[0, i2] * cm2))
                q2m1 = np.float32(np.float32(np.float32(np.float32(pw[1, 16] * m2) * m2)
                                             + np.float32(pw[1, i1] * cm1)) + np.float32(pw[1, i2] * cm2))
                sqx[0] = np.float32(qxp0 + qxp1)
                sqx[1] = np.float32(qxp0 + qxm1)
                sqx[2] = np.float32(qxm0 + qxp1)
                sqx[3] = np.float32(qxm0 + qxm1)
                sq2[0] = np.float32(q2p0 + q2p1)
                sq2[1] = np.float32(q2p0 + q2m1)
                sq2[2] = np.float32(q2m0 + q2p1)
                sq2[3] = np.float32(q2m0 + q2m1)
                for k in range(4):
                    if sq2[k] > F0 and np.float32(sqx[k] * sqx[k]) > np.float32(best_score * sq2[k]):
                        scale = np.float32(sqx[k] / sq2[k])
                        best_score = np.float32(scale * sqx[k])
                        besti1 = i1
                        besti2 = i2
                        best_k = k
        if besti1 < 0 or besti2 < 0 or best_k < 0:
            scales[ib] = F0
            shifts[ib] = 0
            continue
        for j in range(16):
            L[order[j]] = 0 if j < besti1 else (1 if j < besti2 else 2)
        if scale < F0:
            for j in range(16):
                L[j] = 2 - L[j]
            scale = -scale
            best_k = 3 - best_k
        all_on_grid = True
        for k in range(2):
            xx = _m_shift(k, best_k)
            u = 0
            for j in range(8):
                u |= np.int64(L[8 * k + j]) << (2 * j)
            g = kmap[u]
            if g < 0:
                all_on_grid = False
                g = max(_best_neighbour2(neighbours, -g - 1, kgrid, xb, o + 8 * k, weight, scale, xx, L, 8 * k), 0)
            index[k] = g
        if not all_on_grid:
            sumqx = F0
            sumq2 = F0
            for k in range(2):
                xx = _m_shift(k, best_k)
                for j in range(8):
                    w = weight[8 * k + j]
                    q = xx[kgrid[index[k], j] >> 1]
                    sumqx = np.float32(sumqx + np.float32(np.float32(w * q) * xb[o + 8 * k + j]))
                    sumq2 = np.float32(sumq2 + np.float32(np.float32(w * q) * q))
            if sumqx > F0 and sumq2 > F0:
                scale = np.float32(sumqx / sumq2)
        out[pos + M_QS + 2 * ib] = index[0] & 255
        out[pos + M_QS + 2 * ib + 1] = index[1] & 255
        out[pos + M_QH + ib] = ((index[0] >> 8) | ((index[1] >> 8) << 4)) & 0xFF
        scales[ib] = scale
        shifts[ib] = best_k
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == F0:
        return
    d = np.float32(max_scale / np.float32(15.0))
    id_ = np.float32(F1 / d)
    sumqx = F0
    sumq2 = F0
    sc = np.zeros(4, np.int64)
    for ib in range(QK_K // 16):
        l = ggml_nearest_int(np.float32(HALF * np.float32(np.float32(id_ * scales[ib]) - F1)))
        l = 0 if l < 0 else (7 if l > 7 else l)
        sc[ib // 4] |= l << (3 * (ib % 4))
        out[pos + M_QH + ib] |= MASKS[shifts[ib]]
        o = 16 * ib
        _m_weights(xb, o, has_qw, sigma2, qw, wo + o, weight)
        qh = np.int64(out[pos + M_QH + ib])
        fl = np.float32(2 * l + 1)
        for k in range(2):
            xx = _m_shift(k, shifts[ib])
            g = np.int64(out[pos + M_QS + 2 * ib + k]) + ((qh << (8 - 4 * k)) & 0x700)
            for j in range(8):
                w = weight[8 * k + j]
                q = np.float32(xx[kgrid[g, j] >> 1] * fl)
                sumqx = np.float32(sumqx + np.float32(np.float32(w * q) * xb[o + 8 * k + j]))
                sumq2 = np.float32(sumq2 + np.float32(np.float32(w * q) * q))
    if sumq2 > F0:
        d = np.float32(sumqx / sumq2)
    tmp2 = np.zeros(2, np.uint8)
    store_fp16(tmp2, 0, np.float32(d * np.float32(1.1125)))
    u16 = np.int64(tmp2[0]) | (np.int64(tmp2[1]) << 8)
    sc[0] |= (u16 & 0x000F) << 12
    sc[1] |= (u16 & 0x00F0) << 8
    sc[2] |= (u16 & 0x0F00) << 4
    sc[3] |= u16 & 0xF000
    for k in range(4):
        out[pos + M_SCALES + 2 * k] = sc[k] & 0xFF
        out[pos + M_SCALES + 2 * k + 1] = (sc[k] >> 8) & 0xFF


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_rows_m(x, out, qw, has_qw: bool, kgrid, kmap, neighbours) -> None:
    nb = x.shape[1] // QK_K
    total = x.shape[0] * nb
    for c in prange((total + CHUNK - 1) // CHUNK):
        weight = np.empty(16, np.float32)
        L = np.zeros(16, np.int8)
        order = np.empty(16, np.int64)
        tmp = np.empty(16, np.int64)
        px = np.empty((2, 17), np.float32)
        pw = np.empty((2, 17), np.float32)
        scales = np.empty(16, np.float32)
        shifts = np.empty(16, np.int64)
        index = np.empty(2, np.int64)
        for k in range(c * CHUNK, min(total, (c + 1) * CHUNK)):
            r = k // nb
            b = k % nb
            _iq1m_block(x[r, b * QK_K:(b + 1) * QK_K], qw, b * QK_K, has_qw, out[r], b * M_BYTES, kgrid, kmap,
                        neighbours, weight, L, order, tmp, px, pw, scales, shifts, index)


_NO_WEIGHTS = np.zeros(0, np.float32)


def quantize_iq1_m(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_iq1_m without an imatrix (weights x^2), which llama.cpp allows."""
    _quantize_rows_m(x, out, _NO_WEIGHTS, False, *_tables())


def quantize_iq1_m_weighted(x: np.ndarray, out: np.ndarray, qw: np.ndarray) -> None:
    _quantize_rows_m(x, out, qw, True, *_tables())


@njit(parallel=True, cache=True)
def dequantize_iq1_m(q: np.ndarray, out: np.ndarray) -> None:
    """dequantize_row_iq1_m: x = (d * (2s+1)) * (grid[j] + delta), per 16 weights."""
    for r in prange(out.shape[0]):
        row = q[r]
        for b in range(out.shape[1] // QK_K):
            o = b * M_BYTES
            sc = np.empty(4, np.int64)
            for k in range(4):
                sc[k] = np.int64(row[o + M_SCALES + 2 * k]) | (np.int64(row[o + M_SCALES + 2 * k + 1]) << 8)
            bits = (sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) | ((sc[2] >> 4) & 0x0F00) | (sc[3] & 0xF000)
            d = fp16_value(bits)
            for ib in range(16):  # 16-weight blocks: two groups of 8
                s = (sc[ib // 4] >> (3 * (ib % 4))) & 7
                dl = np.float32(d * np.float32(2 * s + 1))
                qh = np.int64(row[o + M_QH + ib])
                for k in range(2):
                    g = np.int64(row[o + M_QS + 2 * ib + k]) | (((qh >> (4 * k)) & 7) << 8)
                    delta = -DELTA if (qh >> (4 * k + 3)) & 1 else DELTA
                    for j in range(8):
                        out[r, b * QK_K + 16 * ib + 8 * k + j] = np.float32(
                            dl * np.float32(np.float32(iq1s_grid[g, j]) + delta))


@njit(parallel=True, cache=True, fastmath=True)
def mv_iq1_m(w, xq, xd, xb, seg, group, out):
    """ggml_vec_dot_iq1_m_q8_K: per 16 weights (2s+1) * sum over its two groups of (grid*codes + delta * sum of
    codes), delta = +-1/8: in integers 8*(grid*codes) +- (sum of codes), scaled by 1/8 at the end."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                s0 = np.int32(w[r, M_SCALES, b]) | (np.int32(w[r, M_SCALES + 1, b]) << 8)
                s1 = np.int32(w[r, M_SCALES + 2, b]) | (np.int32(w[r, M_SCALES + 3, b]) << 8)
                s2 = np.int32(w[r, M_SCALES + 4, b]) | (np.int32(w[r, M_SCALES + 5, b]) << 8)
                s3 = np.int32(w[r, M_SCALES + 6, b]) | (np.int32(w[r, M_SCALES + 7, b]) << 8)
                bits = ((s0 >> 12) & 0xF) | ((s1 >> 8) & 0x00F0) | ((s2 >> 4) & 0x0F00) | (s3 & 0xF000)
                isum = np.float32(0.0)
                for ib in range(16):
                    scw = s0 if ib < 4 else (s1 if ib < 8 else (s2 if ib < 12 else s3))
                    ls = np.float32(2 * ((scw >> (3 * (ib % 4))) & 7) + 1)
                    qh = np.int32(w[r, M_QH + ib, b])
                    tot = np.int32(0)
                    for k in range(2):
                        g = GRID64[np.int32(w[r, M_QS + 2 * ib + k, b]) | (((qh >> (4 * k)) & 7) << 8)]
                        s = np.int32(0)
                        c = np.int32(0)
                        for j in range(8):
                            v = np.int32(np.int8(np.uint8((g >> np.uint64(8 * j)) & np.uint64(0xFF))))
                            x8 = np.int32(xq[t, 16 * ib + 8 * k + j, b])
                            s = np.int32(s + v * x8)
                            c = np.int32(c + x8)
                        neg = np.int32((qh >> (4 * k + 3)) & 1)
                        tot = np.int32(tot + np.int32(8 * s) + np.int32(np.int32(c ^ -neg) + neg))
                    isum += ls * np.float32(tot)
                acc = _acc(acc, seg[b], xd[t, b] * h2f(bits) * isum)
            _put(out, t, r, group, acc, DELTA)
