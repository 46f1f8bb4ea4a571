"""IQ2_XXS, IQ2_XS, IQ2_S: 256-weight super-blocks whose weights come in groups of 8 whose magnitudes are a point
of a lattice grid (8 coordinates, each 0x08, 0x19 or 0x2b), a sign per weight and a 4-bit scale per 32 (IQ2_XXS)
or 16 weights.

Layouts (little-endian; block_iq2_* of ggml-common.h), x = d * (0.5 + s) * 0.25 * grid[j] * sign:
- IQ2_XXS (66 bytes): d:fp16 @0, qs @2: per 32 weights two uint32, the first the four grid indices (one byte
  per 8), the second four 7-bit sign indices into ksigns_iq2xs (bits 0-27) and the scale s (bits 28-31).
- IQ2_XS (74 bytes): d @0, qs @2: a uint16 per 8 (grid index of iq2xs_grid in bits 0-8, sign index in 9-15),
  scales @66: per 32 weights a byte, s of its first 16 in the low nibble, of the second in the high one.
- IQ2_S (82 bytes): d @0, qs @2: 32 bytes of the low 8 bits of iq2s_grid indices, then 32 sign bytes (one bit
  per weight, no parity rule); qh @66: the indices' top 2 bits, four per byte; scales @74 as IQ2_XS's.

Quantization is llama.cpp's quantize_row_iq2_{xxs,xs,s}_impl (ggml_quantize_chunk): per super-block sigma2 =
(2*, IQ2_S) mean x^2, weights qw*sqrtf(sigma2 + x^2) (IQ2_S without an imatrix: sigma2/4 + x^2), the magnitudes'
levels l (value 2l+1) searched over a few trial scales, each group of 8 levels snapped to its grid point or, off
the grid, to the best of its precomputed neighbours (`neighbour_tables`, iq2xs_init_impl), then a least-squares
scale; the sub-block scales to 4 bits against max/31. The 7-bit sign index types (XXS, XS) keep an even number
of minus signs per 8 by flipping the weight of least w*x^2. Float32 operations in C's order, no fused
multiply-add (see kquant_common).

The fused decode kernels (Q8_K activations, matvec.py's planes) gather each group's 8 grid bytes as one uint64.

Measured (4096x4096 with an imatrix, 2 threads, a shared machine at load 3-4): IQ2_XXS 764, IQ2_XS 375, IQ2_S
1341 rows/s, 0.97x, 0.95x, 1.66x llama.cpp's ggml_quantize_chunk (one thread); one thread against one thread
0.8-1.0x. Decode 2048x5632, one token: 1.4x (XXS), 1.8x (XS), 1.6x (S) the time of matvec.mv_q2_k.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from qtool.formats.constants import GGMLType

from .common import load_fp16, store_fp16
from .iq_grids import iq2s_grid, iq2xs_grid, iq2xxs_grid, ksigns_iq2xs
from .kquant_common import F0, F1, QK_K, ggml_nearest_int
from .matvec import ACC0, ONE, _acc, _f16, _put
from .traits import block, fields
from .weighted import make_qp_quants, mean_square, sigma2_weights, twice_mean_square

XXS_BYTES = block(GGMLType.IQ2_XXS)[1]
XS_BYTES = block(GGMLType.IQ2_XS)[1]
S_BYTES = block(GGMLType.IQ2_S)[1]
XXS_D, XXS_QS = fields(GGMLType.IQ2_XXS, "d", "qs")
XS_D, XS_QS, XS_SCALES = fields(GGMLType.IQ2_XS, "d", "qs", "scales")
S_D, S_QS, S_QH, S_SCALES = fields(GGMLType.IQ2_S, "d", "qs", "qh", "scales")
S_SIGNS = S_QS + QK_K // 8

GROUP_MAX_EPS = np.float32(1e-15)
GROUP_MAX_EPS_IQ2_S = np.float32(1e-8)
FLT_MAX = np.float32(3.4028234663852886e38)
HALF = np.float32(0.5)
QUARTER = np.float32(0.25)
TENTH = np.float32(0.1)
KMAX_Q = 3  # levels 0..2, magnitudes 1, 3, 5 in units of the scale
CHUNK = 16  # super-blocks per parallel task (scratch allocated once per task)

# ---- the grids and their neighbours (iq2xs_init_impl) ---------------------------------------------------------
# A point of 8 levels (0..3 each) has the index sum(l_i << 2i). The searches only form points of levels 0..2,
# whose indices are at most 0xAAAA (all 2s): kmap covers indices 0..0xAAAB (43692 entries, as C's kmap_size),
# and every one of them that is not a grid point gets a neighbour list.
KMAP_SIZE = 43692
IQ2_MAGNITUDES = (0x08, 0x19, 0x2B)  # the iq2 grids' bytes for levels 0, 1, 2

_TABLES: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def grid_levels(grid: np.ndarray, values) -> np.ndarray:
    """The level (position in `values`) of each coordinate of a grid (entries, 8) → uint8 (entries, 8)."""
    lut = np.full(256, 255, np.uint8)
    for level, v in enumerate(values):
        lut[np.uint8(np.int64(v) & 0xFF)] = level
    levels = lut[np.asarray(grid).view(np.uint8).reshape(grid.shape)]
    assert (levels != 255).all(), "grid value outside the given levels"
    return levels


def neighbour_tables(name: str, levels: np.ndarray, nwant: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """iq2xs_init_impl's tables for a grid of 8-coordinate points given by their levels (entries, 8), built on
    first use and kept (module cache, keyed by name): kgrid int8 (entries, 8) = 2*level + 1; kmap int32
    (KMAP_SIZE,): the grid index of each point on the grid, -(offset + 1) for the others; neighbours uint16:
    at offset, the count n, then the n grid indices nearest to the point in squared distance of the 2l+1
    values, all those of the nwant smallest distances, by distance then index (C's qsort order)."""
    got = _TABLES.get(name)
    if got is None:
        kgrid = (2 * np.ascontiguousarray(levels, dtype=np.int8) + 1).astype(np.int8)
        kmap = np.full(KMAP_SIZE, -1, np.int32)
        index = (levels.astype(np.int64) << (2 * np.arange(8))).sum(axis=1)
        kmap[index] = np.arange(len(levels), dtype=np.int32)
        counts = np.zeros(KMAP_SIZE, np.int64)
        _neighbour_counts(kgrid, kmap, nwant, counts)
        offsets = np.cumsum(counts + (kmap < 0)) - (counts + (kmap < 0))
        neighbours = np.zeros(int((counts + (kmap < 0)).sum()), np.uint16)
        _neighbour_fill(kgrid, kmap, nwant, offsets, neighbours)
        got = _TABLES[name] = (kgrid, kmap, neighbours)
    return got


@njit(cache=True)
def _distances(kgrid, i: int, d2) -> None:
    for j in range(kgrid.shape[0]):
        s = 0
        for k in range(8):
            diff = np.int64(kgrid[j, k]) - (2 * ((i >> (2 * k)) & 3) + 1)
            s += diff * diff
        d2[j] = s


@njit(cache=True)
def _cutoff(d2, nwant: int, hist) -> int:
    """The nwant-th smallest distinct distance (all of those up to it are the point's neighbours)."""
    hist[:] = 0
    for j in range(d2.shape[0]):
        hist[d2[j]] += 1
    have = 0
    for v in range(hist.shape[0]):
        if hist[v]:
            have += 1
            if have == nwant:
                return v
    return hist.shape[0] - 1


MAX_D2 = 8 * 6 * 6  # coordinates 1..7 against grid values 1..5


@njit(parallel=True, cache=True)
def _neighbour_counts(kgrid, kmap, nwant: int, counts) -> None:
    for i in prange(KMAP_SIZE):
        if kmap[i] >= 0:
            continue
        d2 = np.empty(kgrid.shape[0], np.int64)
        hist = np.empty(MAX_D2 + 1, np.int64)
        _distances(kgrid, i, d2)
        cut = _cutoff(d2, nwant, hist)
        n = 0
        for j in range(d2.shape[0]):
            n += d2[j] <= cut
        counts[i] = n


@njit(parallel=True, cache=True)
def _neighbour_fill(kgrid, kmap, nwant: int, offsets, neighbours) -> None:
    for i in prange(KMAP_SIZE):
        if kmap[i] >= 0:
            continue
        d2 = np.empty(kgrid.shape[0], np.int64)
        hist = np.empty(MAX_D2 + 1, np.int64)
        _distances(kgrid, i, d2)
        cut = _cutoff(d2, nwant, hist)
        o = offsets[i]
        kmap[i] = -(o + 1)
        n = 0
        for v in range(cut + 1):
            if hist[v] == 0:
                continue
            for j in range(d2.shape[0]):
                if d2[j] == v:
                    n += 1
                    neighbours[o + n] = j
        neighbours[o] = n


def _iq2_tables(ggml_type: GGMLType):
    grid, nwant = {GGMLType.IQ2_XXS: (iq2xxs_grid, 2), GGMLType.IQ2_XS: (iq2xs_grid, 2),
                   GGMLType.IQ2_S: (iq2s_grid, 1)}[ggml_type]
    return neighbour_tables(ggml_type.name, grid_levels(grid, IQ2_MAGNITUDES), nwant)


# ---- quantization ------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always", error_model="numpy")
def _level(id_, v) -> int:
    """MAX(0, MIN(kMaxQ-1, nearest_int(0.5f*(id*v - 1))))."""
    l = ggml_nearest_int(np.float32(HALF * np.float32(np.float32(id_ * v) - F1)))
    return 0 if l < 0 else (KMAX_Q - 1 if l > KMAX_Q - 1 else l)


@njit(cache=True, inline="always", error_model="numpy")
def _best_neighbour(neighbours, o: int, kgrid, xval, xo: int, waux, scale, L, lo: int, terms) -> int:
    """iq2_find_best_neighbour: of the neighbours listed at o, the grid point of least waux-weighted squared
    error against xval[xo:xo+8] at this scale; its levels into L[lo:lo+8]. -1 (L untouched) if none compares
    below FLT_MAX (NaN), where C asserts.

    A coordinate's term w*diff*diff depends only on its level (3 values), so the 24 terms are computed once,
    each exactly as C computes it, and every neighbour's d2 sums its 8 terms in C's order. terms: float32 (24,)."""
    for i in range(8):
        for lv in range(3):
            diff = np.float32(np.float32(scale * np.float32(2 * lv + 1)) - xval[xo + i])
            terms[3 * i + lv] = np.float32(np.float32(waux[xo + i] * diff) * diff)
    best_d2 = FLT_MAX
    gi = -1
    for j in range(1, np.int64(neighbours[o]) + 1):
        g = np.int64(neighbours[o + j])
        d2 = F0
        for i in range(8):
            d2 = np.float32(d2 + terms[3 * i + (kgrid[g, i] >> 1)])
        if d2 < best_d2:
            best_d2 = d2
            gi = g
    if gi >= 0:
        for i in range(8):
            L[lo + i] = kgrid[gi, i] >> 1
    return gi


@njit(cache=True, inline="always", error_model="numpy")
def _snap(id_, xval, o: int, L, kmap) -> int:
    """Levels of xval[o:o+8] at inverse scale id_ into L[o:o+8]; returns the kmap entry of the point."""
    u = 0
    for i in range(8):
        l = _level(id_, xval[o + i])
        L[o + i] = l
        u |= l << (2 * i)
    return kmap[u]


@njit(cache=True, inline="always", error_model="numpy")
def _grid_point(L, o: int, kmap) -> int:
    u = 0
    for i in range(8):
        u |= np.int64(L[o + i]) << (2 * i)
    u &= 0xFFFF
    return kmap[u] if u < KMAP_SIZE else -1


@njit(cache=True, inline="always", error_model="numpy")
def _sums(weight, xval, L, n: int):
    sumqx = F0
    sumq2 = F0
    for i in range(n):
        w = weight[i]
        q = np.float32(2 * np.int64(L[i]) + 1)
        sumqx = np.float32(sumqx + np.float32(np.float32(w * xval[i]) * q))
        sumq2 = np.float32(sumq2 + np.float32(np.float32(w * q) * q))
    return sumqx, sumq2


@njit(cache=True, inline="always", error_model="numpy")
def _signs(xb, o: int, weight, xval, k: int, parity: bool) -> int:
    """|x| of group k (8 weights of xb from o) into xval; its sign bits. parity: the 7-bit sign index types
    keep an even count of minus signs, the weight of least weight*x^2 takes the flip (its xval negated)."""
    s = 0
    nflip = 0
    for i in range(8):
        v = xb[o + 8 * k + i]
        if v >= F0:
            xval[8 * k + i] = v
        else:
            xval[8 * k + i] = -v
            nflip += 1
            s |= 1 << i
    if parity and nflip % 2:
        imin = 0
        v = xb[o + 8 * k]
        mn = np.float32(np.float32(weight[8 * k] * v) * v)
        for i in range(1, 8):
            v = xb[o + 8 * k + i]
            ax = np.float32(np.float32(weight[8 * k + i] * v) * v)
            if ax < mn:
                mn = ax
                imin = i
        xval[8 * k + imin] = -xval[8 * k + imin]
        s ^= 1 << imin
    return s & 127 if parity else s


@njit(cache=True, inline="always", error_model="numpy")
def _max(xval, n: int) -> np.float32:
    m = xval[0]
    for i in range(1, n):
        m = m if m > xval[i] else xval[i]  # MAX(max, xval[i])
    return m


@njit(cache=True, error_model="numpy")
def _search_xxs(xval, weight, waux, L, Laux, Lq, kgrid, kmap, neighbours, terms):
    """quantize_row_iq2_xxs_impl's search of one 32-weight sub-block whose max is above GROUP_MAX_EPS: (scale,
    False) and the levels L[:32], or (0, True) for a sub-block C leaves empty (scale*kMaxQ <= 0)."""
    scale = make_qp_quants(32, KMAX_Q + 1, xval, Lq, weight)
    for i in range(32):
        L[i] = np.int8(Lq[i])
    eff_max = np.float32(scale * np.float32(KMAX_Q))
    if eff_max <= F0:
        return F0, True
    best = F0
    for is_ in range(-6, 7):
        id_ = np.float32(np.float32(np.float32(2 * KMAX_Q - 1) + np.float32(np.float32(is_) * TENTH)) / eff_max)
        this_scale = np.float32(F1 / id_)
        for k in range(4):
            g = _snap(id_, xval, 8 * k, Laux, kmap)
            if g < 0:
                _best_neighbour(neighbours, -g - 1, kgrid, xval, 8 * k, waux, this_scale, Laux, 8 * k, terms)
        sumqx, sumq2 = _sums(weight, xval, Laux, 32)
        if sumq2 > F0 and np.float32(sumqx * sumqx) > np.float32(best * sumq2):
            scale = np.float32(sumqx / sumq2)
            best = np.float32(scale * sumqx)
            for i in range(32):
                L[i] = Laux[i]
    if scale > F0:
        id_ = np.float32(F1 / scale)
        for k in range(4):
            g = _snap(id_, xval, 8 * k, Lq, kmap)  # Lq: scratch, C keeps these levels nowhere
            if g < 0:
                g = _best_neighbour(neighbours, -g - 1, kgrid, xval, 8 * k, waux, scale, L, 8 * k, terms)
            if g >= 0:
                for i in range(8):
                    L[8 * k + i] = (kgrid[g, i] - 1) // 2
        sumqx, sumq2 = _sums(weight, xval, L, 32)
        if sumq2 > F0:
            scale = np.float32(sumqx / sumq2)
    return scale, False


@njit(cache=True, error_model="numpy")
def _search16(xval, weight, waux, L, Laux, kgrid, kmap, neighbours, mx, terms) -> np.float32:
    """quantize_row_iq2_xs_impl's (and _s_impl's) search of one 16-weight sub-block of max mx: the scale and
    the levels L[:16]; only the groups that the winning trial took off the grid are snapped again."""
    for i in range(16):
        L[i] = 0
    best = F0
    scale = np.float32(mx / np.float32(2 * KMAX_Q - 1))
    on0 = True
    on1 = True
    for is_ in range(-9, 10):
        id_ = np.float32(np.float32(np.float32(2 * KMAX_Q - 1) + np.float32(np.float32(is_) * TENTH)) / mx)
        this_scale = np.float32(F1 / id_)
        g0 = _snap(id_, xval, 0, Laux, kmap)
        if g0 < 0:
            _best_neighbour(neighbours, -g0 - 1, kgrid, xval, 0, waux, this_scale, Laux, 0, terms)
        g1 = _snap(id_, xval, 8, Laux, kmap)
        if g1 < 0:
            _best_neighbour(neighbours, -g1 - 1, kgrid, xval, 8, waux, this_scale, Laux, 8, terms)
        sumqx, sumq2 = _sums(weight, xval, Laux, 16)
        if sumq2 > F0 and np.float32(sumqx * sumqx) > np.float32(best * sumq2):
            scale = np.float32(sumqx / sumq2)
            best = np.float32(scale * sumqx)
            for i in range(16):
                L[i] = Laux[i]
            on0 = g0 >= 0
            on1 = g1 >= 0
    if (not on0 or not on1) and scale > F0:
        id_ = np.float32(F1 / scale)
        for k in range(2):
            if (on0, on1)[k]:
                continue
            g = _snap(id_, xval, 8 * k, L, kmap)
            if g < 0:
                _best_neighbour(neighbours, -g - 1, kgrid, xval, 8 * k, waux, scale, L, 8 * k, terms)
        sumqx, sumq2 = _sums(weight, xval, L, 16)
        if sumq2 > F0:
            scale = np.float32(sumqx / sumq2)
    return scale


@njit(cache=True, inline="always", error_model="numpy")
def _sub_scale(id_, s) -> int:
    l = ggml_nearest_int(np.float32(HALF * np.float32(np.float32(id_ * s) - F1)))
    return 0 if l < 0 else (15 if l > 15 else l)


@njit(cache=True, error_model="numpy")
def _xxs_block(xb, qw, wo: int, out, pos: int, kgrid, kmap, neighbours, weight, waux, xval, L, Laux, Lq,
               scales, q2, signs, terms) -> None:
    """quantize_row_iq2_xxs_impl on one super-block xb[:256] (importance qw[wo:wo+256]) into out[pos:pos+66]."""
    out[pos + XXS_D] = 0
    out[pos + XXS_D + 1] = 0
    q2[:] = 0
    max_scale = F0
    sigma2 = mean_square(xb, 0, QK_K)
    for ib in range(QK_K // 32):
        o = 32 * ib
        sigma2_weights(xb, o, 32, sigma2, qw, wo + o, weight)
        for i in range(32):
            waux[i] = np.float32(np.sqrt(weight[i]))
        for k in range(4):
            signs[k] = _signs(xb, o, weight, xval, k, True)
        if _max(xval, 32) < GROUP_MAX_EPS:
            scales[ib] = F0
            continue
        scale, empty = _search_xxs(xval, weight, waux, L, Laux, Lq, kgrid, kmap, neighbours, terms)
        if empty:
            scales[ib] = F0
            continue
        if scale < F0:
            scale = -scale
            for k in range(4):
                signs[k] = (~signs[k]) & 127
        for k in range(4):
            g = _grid_point(L, 8 * k, kmap)
            q2[2 * ib] |= np.uint32(max(g, 0)) << np.uint32(8 * k)
            q2[2 * ib + 1] |= np.uint32(signs[k]) << np.uint32(7 * k)
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == F0:
        for i in range(QK_K // 4):
            out[pos + XXS_QS + i] = 0
        return
    d = np.float32(max_scale / np.float32(31.0))
    store_fp16(out, pos + XXS_D, d)
    id_ = np.float32(F1 / d)
    for ib in range(QK_K // 32):
        q2[2 * ib + 1] |= np.uint32(_sub_scale(id_, scales[ib])) << np.uint32(28)
    for i in range(QK_K // 16):
        for b in range(4):
            out[pos + XXS_QS + 4 * i + b] = (q2[i] >> np.uint32(8 * b)) & np.uint32(0xFF)


@njit(cache=True, error_model="numpy")
def _xs_s_block(xb, qw, wo: int, has_qw: bool, out, pos: int, is_s: bool, kgrid, kmap, neighbours, weight, waux,
                xval, L, Laux, scales, q2, signs, terms) -> None:
    """quantize_row_iq2_xs_impl (is_s False) or quantize_row_iq2_s_impl on one super-block xb[:256] into
    out[pos:]. IQ2_S writes each sub-block's indices and signs as it goes (and leaves them when every scale is
    0), IQ2_XS at the end; IQ2_S stores d*0.9875 and takes no importance at will."""
    nbytes = S_BYTES if is_s else XS_BYTES
    for i in range(nbytes):
        out[pos + i] = 0
    q2[:] = 0
    max_scale = F0
    sigma2 = twice_mean_square(xb, 0, QK_K) if is_s else mean_square(xb, 0, QK_K)
    eps = GROUP_MAX_EPS_IQ2_S if is_s else GROUP_MAX_EPS
    for ib in range(QK_K // 16):
        o = 16 * ib
        if has_qw:
            sigma2_weights(xb, o, 16, sigma2, qw, wo + o, weight)
        else:
            for i in range(16):
                v = xb[o + i]
                weight[i] = np.float32(np.float32(QUARTER * sigma2) + np.float32(v * v))
        for i in range(16):
            waux[i] = np.float32(np.sqrt(weight[i]))
        for k in range(2):
            signs[k] = _signs(xb, o, weight, xval, k, not is_s)
        mx = _max(xval, 16)
        if mx < eps:
            scales[ib] = F0
            continue
        scale = _search16(xval, weight, waux, L, Laux, kgrid, kmap, neighbours, mx, terms)
        if scale < F0:
            scale = -scale
            for k in range(2):
                signs[k] = (~signs[k]) & (0xFF if is_s else 127)
        for k in range(2):
            g = max(_grid_point(L, 8 * k, kmap), 0)  # C aborts on a point off the grid (NaN weights)
            i8 = 2 * ib + k
            if is_s:
                out[pos + S_QS + i8] = g & 255
                out[pos + S_QH + i8 // 4] |= ((g >> 8) << (2 * (i8 % 4))) & 0xFF
                out[pos + S_SIGNS + i8] = signs[k]
            else:
                q2[i8] = np.uint32(g | (signs[k] << 9))
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == F0:
        return
    d = np.float32(max_scale / np.float32(31.0))
    if is_s:
        store_fp16(out, pos + S_D, np.float32(d * np.float32(0.9875)))
    else:
        store_fp16(out, pos + XS_D, d)
    id_ = np.float32(F1 / d)
    sc = S_SCALES if is_s else XS_SCALES
    for ib in range(QK_K // 16):
        out[pos + sc + ib // 2] |= _sub_scale(id_, scales[ib]) << (4 * (ib % 2))
    if not is_s:
        for i in range(QK_K // 8):
            out[pos + XS_QS + 2 * i] = q2[i] & np.uint32(0xFF)
            out[pos + XS_QS + 2 * i + 1] = (q2[i] >> np.uint32(8)) & np.uint32(0xFF)


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_rows(x, out, qw, has_qw: bool, kind: int, kgrid, kmap, neighbours) -> None:
    """kind 0 IQ2_XXS, 1 IQ2_XS, 2 IQ2_S over rows; parallel over chunks of CHUNK super-blocks counted row after
    row (every super-block is quantized on its own)."""
    nb = x.shape[1] // QK_K
    total = x.shape[0] * nb
    nbytes = (XXS_BYTES, XS_BYTES, S_BYTES)[kind]
    for c in prange((total + CHUNK - 1) // CHUNK):
        weight = np.empty(32, np.float32)
        waux = np.empty(32, np.float32)
        xval = np.empty(32, np.float32)
        L = np.zeros(32, np.int8)
        Laux = np.zeros(32, np.int8)
        Lq = np.zeros(32, np.uint8)
        scales = np.empty(16, np.float32)
        q2 = np.empty(32, np.uint32)
        signs = np.empty(4, np.int64)
        terms = np.empty(24, np.float32)
        for k in range(c * CHUNK, min(total, (c + 1) * CHUNK)):
            r = k // nb
            b = k % nb
            xb = x[r, b * QK_K:(b + 1) * QK_K]
            if kind == 0:
                _xxs_block(xb, qw, b * QK_K, out[r], b * nbytes, kgrid, kmap, neighbours, weight, waux, xval, L,
                           Laux, Lq, scales, q2, signs, terms)
            else:
                _xs_s_block(xb, qw, b * QK_K, has_qw, out[r], b * nbytes, kind == 2, kgrid, kmap, neighbours,
                            weight, waux, xval, L, Laux, scales, q2, signs, terms)


_NO_WEIGHTS = np.zeros(0, np.float32)


def quantize_iq2_xxs_weighted(x: np.ndarray, out: np.ndarray, qw: np.ndarray) -> None:
    """quantize_iq2_xxs (ggml_quantize_chunk with an imatrix; llama.cpp has no IQ2_XXS without one)."""
    _quantize_rows(x, out, qw, True, 0, *_iq2_tables(GGMLType.IQ2_XXS))


def quantize_iq2_xs_weighted(x: np.ndarray, out: np.ndarray, qw: np.ndarray) -> None:
    """quantize_iq2_xs (with an imatrix only, as IQ2_XXS)."""
    _quantize_rows(x, out, qw, True, 1, *_iq2_tables(GGMLType.IQ2_XS))


def quantize_iq2_s(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_iq2_s without an imatrix (quantize_row_iq2_s_ref: weights sigma2/4 + x^2)."""
    _quantize_rows(x, out, _NO_WEIGHTS, False, 2, *_iq2_tables(GGMLType.IQ2_S))


def quantize_iq2_s_weighted(x: np.ndarray, out: np.ndarray, qw: np.ndarray) -> None:
    _quantize_rows(x, out, qw, True, 2, *_iq2_tables(GGMLType.IQ2_S))


def quantize_refused(x: np.ndarray, out: np.ndarray) -> None:
    """The plain quantizer of IQ2_XXS and IQ2_XS, never reached: traits refuses them without an imatrix."""
    raise ValueError("needs an importance matrix")


# ---- dequantization (dequantize_row_iq2_*; gguf-py's arithmetic: (db * grid) * sign, db = d*(0.5+s)*0.25) -------
KSIGNS = ksigns_iq2xs


@njit(cache=True, inline="always")
def _db(d, s) -> np.float32:
    return np.float32(np.float32(d * np.float32(HALF + np.float32(s))) * QUARTER)


@njit(cache=True, inline="always")
def _put8(y, yo: int, db, grid, g: int, signs: int) -> None:
    for j in range(8):
        v = np.float32(db * np.float32(grid[g, j]))
        y[yo + j] = -v if (signs >> j) & 1 else v


@njit(parallel=True, cache=True)
def dequantize_iq2_xxs(q: np.ndarray, out: np.ndarray) -> None:
    for r in prange(out.shape[0]):
        row = q[r]
        for b in range(out.shape[1] // QK_K):
            o = b * XXS_BYTES
            d = load_fp16(row, o + XXS_D)
            for ib in range(8):
                p = o + XXS_QS + 8 * ib
                aux = np.uint32(row[p + 4]) | (np.uint32(row[p + 5]) << np.uint32(8)) \
                    | (np.uint32(row[p + 6]) << np.uint32(16)) | (np.uint32(row[p + 7]) << np.uint32(24))
                db = _db(d, aux >> np.uint32(28))
                for l in range(4):
                    sg = KSIGNS[(aux >> np.uint32(7 * l)) & np.uint32(127)]
                    _put8(out[r], b * QK_K + 32 * ib + 8 * l, db, iq2xxs_grid, row[p + l], sg)


@njit(parallel=True, cache=True)
def dequantize_iq2_xs(q: np.ndarray, out: np.ndarray) -> None:
    for r in prange(out.shape[0]):
        row = q[r]
        for b in range(out.shape[1] // QK_K):
            o = b * XS_BYTES
            d = load_fp16(row, o + XS_D)
            for i in range(QK_K // 8):
                v = np.int64(row[o + XS_QS + 2 * i]) | (np.int64(row[o + XS_QS + 2 * i + 1]) << 8)
                s = (row[o + XS_SCALES + i // 4] >> (4 * ((i // 2) % 2))) & 15
                _put8(out[r], b * QK_K + 8 * i, _db(d, s), iq2xs_grid, v & 511, KSIGNS[v >> 9])


@njit(parallel=True, cache=True)
def dequantize_iq2_s(q: np.ndarray, out: np.ndarray) -> None:
    for r in prange(out.shape[0]):
        row = q[r]
        for b in range(out.shape[1] // QK_K):
            o = b * S_BYTES
            d = load_fp16(row, o + S_D)
            for i in range(QK_K // 8):
                g = np.int64(row[o + S_QS + i]) | (((np.int64(row[o + S_QH + i // 4]) >> (2 * (i % 4))) & 3) << 8)
                s = (row[o + S_SCALES + i // 4] >> (4 * ((i // 2) % 2))) & 15
                _put8(out[r], b * QK_K + 8 * i, _db(d, s), iq2s_grid, g, row[o + S_SIGNS + i])


# ---- fused decode kernels: w planes (N, block bytes, lanes); xq (T, 256, lanes) int16; xd (T, lanes) ---------------
# Each group's 8 grid bytes are gathered as one uint64; |grid| * |code| reaches 43 * 127, so sums are int32. The
# integer sum of a scale's weights times 2s+1 gives x's d*(0.5+s)*0.25 as d/8 * (2s+1).
GRID64_XXS = np.ascontiguousarray(iq2xxs_grid).view(np.uint64).reshape(-1)
GRID64_XS = np.ascontiguousarray(iq2xs_grid).view(np.uint64).reshape(-1)
GRID64_S = np.ascontiguousarray(iq2s_grid).view(np.uint64).reshape(-1)
EIGHTH = np.float32(0.125)


@njit(cache=True, inline="always")
def _dot8(g, sg, xq, t, e0, b) -> np.int32:
    """Sum over j < 8 of byte j of g, negated where bit j of sg is set, times activation code e0 + j."""
    s = np.int32(0)
    for j in range(8):
        v = np.int32((g >> np.uint64(8 * j)) & np.uint64(0xFF)) * np.int32(xq[t, e0 + j, b])
        neg = np.int32((sg >> j) & 1)
        s = np.int32(s + np.int32(np.int32(v ^ -neg) + neg))
    return s


@njit(cache=True, inline="always")
def _ksign(i) -> np.int32:
    """ksigns_iq2xs[i]: the 7 bits of i and their parity in bit 7."""
    p = i ^ (i >> 4)
    p ^= p >> 2
    p ^= p >> 1
    return np.int32(i | ((p & 1) << 7))


@njit(parallel=True, cache=True, fastmath=True)
def mv_iq2_xxs(w, xq, xd, xb, seg, group, out):
    """block_iq2_xxs: d, then per 32 weights 4 grid-index bytes and a uint32 of 4 sign indices and the scale."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                isum = F0
                for ib in range(8):
                    p = XXS_QS + 8 * ib
                    aux = np.int32(w[r, p + 4, b]) | (np.int32(w[r, p + 5, b]) << 8) \
                        | (np.int32(w[r, p + 6, b]) << 16) | (np.int32(w[r, p + 7, b]) << 24)
                    s = np.int32(0)
                    for l in range(4):
                        g = GRID64_XXS[w[r, p + l, b]]
                        s = np.int32(s + _dot8(g, _ksign((aux >> (7 * l)) & 127), xq, t, 32 * ib + 8 * l, b))
                    isum += np.float32(s) * np.float32(2 * ((aux >> 28) & 15) + 1)
                acc = _acc(acc, seg[b], xd[t, b] * _f16(w, r, XXS_D, b) * isum)
            _put(out, t, r, group, acc, EIGHTH)


@njit(parallel=True, cache=True, fastmath=True)
def mv_iq2_xs(w, xq, xd, xb, seg, group, out):
    """block_iq2_xs: d, a uint16 per 8 weights (9-bit grid index, 7-bit sign index), 4-bit scales per 16."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                isum = F0
                for ib in range(16):
                    s = np.int32(0)
                    for l in range(2):
                        i = 2 * ib + l
                        v = np.int32(w[r, XS_QS + 2 * i, b]) | (np.int32(w[r, XS_QS + 2 * i + 1, b]) << 8)
                        s = np.int32(s + _dot8(GRID64_XS[v & 511], _ksign(v >> 9), xq, t, 8 * i, b))
                    sc = (np.int32(w[r, XS_SCALES + ib // 2, b]) >> (4 * (ib % 2))) & 15
                    isum += np.float32(s) * np.float32(2 * sc + 1)
                acc = _acc(acc, seg[b], xd[t, b] * _f16(w, r, XS_D, b) * isum)
            _put(out, t, r, group, acc, EIGHTH)


@njit(parallel=True, cache=True, fastmath=True)
def mv_iq2_s(w, xq, xd, xb, seg, group, out):
    """block_iq2_s: d, 32 low index bytes, 32 sign bytes, qh (2 high index bits per 8), 4-bit scales per 16."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                isum = F0
                for ib in range(16):
                    s = np.int32(0)
                    for l in range(2):
                        i = 2 * ib + l
                        g = np.int32(w[r, S_QS + i, b]) \
                            | (((np.int32(w[r, S_QH + i // 4, b]) >> (2 * (i % 4))) & 3) << 8)
                        s = np.int32(s + _dot8(GRID64_S[g], np.int32(w[r, S_SIGNS + i, b]), xq, t, 8 * i, b))
                    sc = (np.int32(w[r, S_SCALES + ib // 2, b]) >> (4 * (ib % 2))) & 15
                    isum += np.float32(s) * np.float32(2 * sc + 1)
                acc = _acc(acc, seg[b], xd[t, b] * _f16(w, r, S_D, b) * isum)
            _put(out, t, r, group, acc, EIGHTH)
