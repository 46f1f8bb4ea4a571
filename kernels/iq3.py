"""IQ3_XXS and IQ3_S: super-blocks of 256 weights whose groups of 4 magnitudes are points of a 3-bit D4 grid
(ggml's block_iq3_xxs, block_iq3_s), signs stored apart.

Layouts (little-endian):
- IQ3_XXS (98 bytes): d:fp16 @0, qs[64] @2 (grid indices into iq3xxs_grid, 256 points), scales_and_signs[8]
  uint32 @66, one per 32 weights: bits 7j..7j+6 the sign pattern of its j-th 8 weights (ksigns_iq2xs: the 8th
  sign makes the count of minus signs even), bits 28-31 the scale s; weight = d*(0.5 + s)*0.5 * magnitude * sign.
- IQ3_S (110 bytes): d @0, qs[64] @2 (low 8 bits of indices into iq3s_grid, 512 points), qh[8] @66 (bit k of
  qh[j]: bit 8 of index k of 32-weight block j), signs[32] @74 (one bit per weight), scales[4] @106 (two 4-bit
  scales s per byte, low nibble first); weight = d*(1 + 2s) * magnitude * sign.

Quantization is quantize_row_iq3_xxs_impl / quantize_row_iq3_s_impl (ggml_quantize_chunk, with or without an
importance matrix): per 32 weights, the signs are split off (IQ3_XXS flips the least important one when their
count is odd), then 31 (IQ3_XXS) / 19 (IQ3_S) trial scales each round every 4 magnitudes to the 3-bit lattice;
a point off the grid is replaced by its best neighbour in the grid (the neighbour lists of iq3xs_init_impl:
every grid point within the two (IQ3_XXS) / three (IQ3_S) smallest distances of that lattice point), and the
least-squares fit of the best trial is kept. The neighbour tables are built on first quantize (`tables`).

Bit-exactness: float32 arithmetic in C's order (`w*x*q` is (w*x)*q), ggml's nearest_int, C's MAX macro (a NaN
comparison picks the second operand), no fused multiply-add. Two quirks of the C kept on purpose: IQ3_S does not
advance its qs/signs pointers past an all-zero 32-weight block (later blocks' bytes move forward, the last slots
stay 0, qh is indexed absolutely), and IQ3_XXS's flip of a negative scale inverts only the 7 stored sign bits.
Where llama.cpp aborts (GGML_ASSERT(scale >= 0) on a NaN scale, or no neighbour with a finite distance: inf,
NaN or weights whose squares overflow), qtool writes what the C would write without the assert (a NaN scale gives
d = NaN) and `llama_cpp_aborts` tells which rows those are.

Speed (4096x4096, 2 threads on a machine shared with other work, load 5-7): 640 / 460 rows/s (IQ3_XXS plain /
weighted), 600 / 550 (IQ3_S); llama.cpp's ggml_quantize_chunk (one thread) 244 / 371 rows/s plain.

Fused decode kernels (mv_iq3_xxs, mv_iq3_s) are matvec.py's kind for Q8_K activations (planes, one lane per
super-block), see below; on 2048x5632, one token, one thread: 1.6-1.75x mv_q3_k's time, both types (3.3-3.7 ms
against 2.1 ms; the grid lookups are gathers).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from qtool.formats.constants import GGMLType

from .common import load_fp16, store_fp16
from .iq_grids import iq3s_grid, iq3xxs_grid, ksigns_iq2xs
from .kquant_common import F0, QK_K, ggml_nearest_int
from .matvec import ACC0, ONE, _acc, _f16, _i16, _put
from .traits import block, fields
from .weighted import sigma2_weights, twice_mean_square

XXS_BYTES = block(GGMLType.IQ3_XXS)[1]
S_BYTES = block(GGMLType.IQ3_S)[1]
XXS_D, XXS_QS, XXS_SS = fields(GGMLType.IQ3_XXS, "d", "qs", "scales_and_signs")
S_D, S_QS, S_QH, S_SIGNS, S_SCALES = fields(GGMLType.IQ3_S, "d", "qs", "qh", "signs", "scales")

F05 = np.float32(0.5)
F1 = np.float32(1.0)
FM1 = np.float32(-1.0)
FLT_MAX = np.float32(3.4028234663852886e38)
GROUP_MAX_EPS_IQ3_XXS = np.float32(1e-8)
KMAX_Q = 8  # 3-bit codes l, lattice coordinate 2l+1
KMAP_SIZE = 1 << 12  # 4 codes of 3 bits

# the grids' magnitudes (what dequantize multiplies) → the lattice codes l the quantizer works on
XXS_LEVELS = np.array([4, 12, 20, 28, 36, 44, 52, 62], dtype=np.uint8)  # IQ3_XXS: l → magnitude
S_LEVELS = np.arange(1, 16, 2, dtype=np.uint8)  # IQ3_S: 2l + 1

# decode tables: one uint32 per grid point (its 4 magnitudes, byte i = coordinate i), the 8-bit sign patterns
XXS_GRID32 = np.ascontiguousarray(iq3xxs_grid).view(np.uint32).reshape(-1).copy()
S_GRID32 = np.ascontiguousarray(iq3s_grid).view(np.uint32).reshape(-1).copy()
XXS_MAG = iq3xxs_grid.astype(np.float32)
S_MAG = iq3s_grid.astype(np.float32)
KSIGNS = ksigns_iq2xs.copy()


# ---- iq3xs_init_impl: the grid in lattice codes, the map of every lattice point, the neighbour lists ----------------
_TABLES: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}


def grid_codes(grid_size: int) -> np.ndarray:
    """The grid's points as 3-bit lattice codes l (grid_size, 4) int64 (iq3xs_init_impl's kgrid_256/kgrid_512,
    read off the magnitudes of iq3xxs_grid / iq3s_grid)."""
    mags, levels = (iq3xxs_grid, XXS_LEVELS) if grid_size == 256 else (iq3s_grid, S_LEVELS)
    lut = np.full(256, -1, dtype=np.int64)
    lut[levels] = np.arange(8)
    codes = lut[mags]
    assert codes.min() >= 0 and codes.shape == (grid_size, 4)
    return codes


def tables(grid_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """iq3xs_init_impl(grid_size), built on first use and cached: (grid_pos float32 (n, 4) the lattice
    coordinates 2l+1 of each grid point, grid_l int32 (n, 4) its codes l, kmap int32 (4096,), neighbours uint16).

    kmap[u] for the lattice point u = l0 | l1 << 3 | l2 << 6 | l3 << 9 is its grid index, or -(o + 1) for a point
    off the grid, whose neighbour list is neighbours[o] = count, then the grid indices, ordered by squared
    distance then index, of every grid point within its nwant smallest distances (2 for 256 points, 3 for 512).
    Lists follow each other in order of u."""
    got = _TABLES.get(grid_size)
    if got is not None:
        return got
    nwant = 2 if grid_size == 256 else 3
    codes = grid_codes(grid_size)
    pos = 2 * codes + 1
    kmap = np.full(KMAP_SIZE, -1, dtype=np.int32)
    kmap[(codes << np.array([0, 3, 6, 9])).sum(axis=1)] = np.arange(grid_size, dtype=np.int32)
    off = np.flatnonzero(kmap < 0)
    points = 2 * ((off[:, None] >> np.array([0, 3, 6, 9])) & 7) + 1
    d2 = ((points[:, None, :] - pos[None, :, :]) ** 2).sum(axis=2)  # (off-grid points, grid points)
    order = np.argsort(d2, axis=1, kind="stable")  # by distance, then by index (qsort on (d2, j) pairs)
    sd2 = np.take_along_axis(d2, order, axis=1)
    # a point's list: every grid point whose distance is among its nwant smallest distinct ones
    rank = np.cumsum(np.concatenate([np.zeros((len(off), 1), bool), sd2[:, 1:] > sd2[:, :-1]], axis=1), axis=1)
    keep = rank < nwant
    counts = keep.sum(axis=1)
    nbrs = np.empty(int(counts.sum() + len(off)), dtype=np.uint16)
    starts = np.concatenate([[0], np.cumsum(counts + 1)[:-1]])
    nbrs[starts] = counts
    nbrs[(starts[:, None] + 1 + np.arange(d2.shape[1]))[keep]] = order[keep]  # keep: a prefix of each row
    kmap[off] = -(starts + 1)
    got = (pos.astype(np.float32), codes.astype(np.int32), kmap, nbrs)
    _TABLES[grid_size] = got
    return got


# ---- quantize -------------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always", error_model="numpy")
def _cmax(a, b):
    return a if a > b else b  # ggml's MAX(a, b)


@njit(cache=True, error_model="numpy")
def _best_neighbour(nbrs, start, grid_pos, grid_l, xval, o, waux, scale, L):
    """iq3_find_best_neighbour: the neighbour g of the list at nbrs[start] least far from xval[o:o+4], as
    sum waux*(scale*g - x)^2; its codes into L[o:o+4]. Returns (grid index, found): not found when no distance
    is below FLT_MAX (llama.cpp aborts there; the first neighbour is taken)."""
    n = nbrs[start]
    best_d2 = FLT_MAX
    gi = -1
    for j in range(1, n + 1):
        g = np.int64(nbrs[start + j])
        d2 = F0
        for i in range(4):
            diff = np.float32(np.float32(scale * grid_pos[g, i]) - xval[o + i])
            d2 = np.float32(d2 + np.float32(np.float32(waux[o + i] * diff) * diff))
        if d2 < best_d2:
            best_d2 = d2
            gi = g
    found = gi >= 0
    if not found:
        gi = np.int64(nbrs[start + 1])
    for i in range(4):
        L[o + i] = grid_l[gi, i]
    return gi, found


@njit(cache=True, inline="always", error_model="numpy")
def _lattice_index(xval, o, idv, L, lo):
    """The lattice point of xval[o:o+4] at inverse scale idv: codes clamp(nearest_int(0.5*(id*x - 1)), 0, 7)
    (into L[lo:lo+4] when L is given) packed 3 bits each."""
    u = 0
    for i in range(4):
        l = ggml_nearest_int(np.float32(F05 * np.float32(np.float32(idv * xval[o + i]) - F1)))
        l = 0 if l < 0 else (KMAX_Q - 1 if l > KMAX_Q - 1 else l)
        if lo >= 0:
            L[lo + i] = l
        u |= l << (3 * i)
    return u


@njit(cache=True, error_model="numpy")
def _sub_block(weight, waux, xval, L, Laux, on_grid, on_aux, xxs, grid_pos, grid_l, kmap, nbrs):
    """The search of one 32-weight block (weight, waux = sqrt(weight), xval = |x| ready): codes
    L[:32], returns (scale, ok). xxs: IQ3_XXS's 31 trials, else IQ3_S's 19. ok False where llama.cpp aborts."""
    mx = xval[0]
    for i in range(1, 32):
        mx = _cmax(mx, xval[i])
    for i in range(32):
        L[i] = 0
    ok = True
    best = F0
    scale = np.float32(mx / np.float32(2 * KMAX_Q - 1))
    ntry = 15 if xxs else 9
    for k in range(8):
        on_grid[k] = xxs
    for is_ in range(-ntry, ntry + 1):
        idv = np.float32(np.float32(np.float32(2 * KMAX_Q - 1) + np.float32(np.float32(is_) * np.float32(0.2)))
                         / mx)
        this_scale = np.float32(F1 / idv)
        for k in range(8):
            u = _lattice_index(xval, 4 * k, idv, Laux, 4 * k)
            on_aux[k] = True
            if kmap[u] < 0:
                on_aux[k] = False
                _, f = _best_neighbour(nbrs, -kmap[u] - 1, grid_pos, grid_l, xval, 4 * k, waux, this_scale, Laux)
                ok &= f
        sumqx = F0
        sumq2 = F0
        for i in range(32):
            w = weight[i]
            q = np.float32(2 * Laux[i] + 1)
            sumqx = np.float32(sumqx + np.float32(np.float32(w * xval[i]) * q))
            sumq2 = np.float32(sumq2 + np.float32(np.float32(w * q) * q))
        if sumq2 > F0 and np.float32(sumqx * sumqx) > np.float32(best * sumq2):
            scale = np.float32(sumqx / sumq2)
            best = np.float32(scale * sumqx)
            for i in range(32):
                L[i] = Laux[i]
            for k in range(8):
                on_grid[k] = on_aux[k]
    n_off = 0
    for k in range(8):
        if not on_grid[k]:
            n_off += 1
    if n_off > 0 and scale > F0:
        idv = np.float32(F1 / scale)
        for k in range(8):
            if xxs and on_grid[k]:
                continue  # (IQ3_S redoes every group)
            u = _lattice_index(xval, 4 * k, idv, L, -1)
            gi = np.int64(kmap[u])
            if gi < 0:
                gi, f = _best_neighbour(nbrs, -kmap[u] - 1, grid_pos, grid_l, xval, 4 * k, waux, scale, L)
                ok &= f
            for i in range(4):
                L[4 * k + i] = grid_l[gi, i]
        sumqx = F0
        sumq2 = F0
        for i in range(32):
            w = weight[i]
            q = np.float32(2 * L[i] + 1)
            sumqx = np.float32(sumqx + np.float32(np.float32(w * xval[i]) * q))
            sumq2 = np.float32(sumq2 + np.float32(np.float32(w * q) * q))
        if sumq2 > F0:
            scale = np.float32(sumqx / sumq2)
    return scale, ok


@njit(cache=True, error_model="numpy")
def _prepare(xb, xo, sigma2, qw, qo, weighted, weight, waux, xval):
    """The weights of xb[xo:xo+32]: qw*sqrtf(sigma2 + x^2) with an importance matrix, else x^2; waux = sqrtf."""
    if weighted:
        sigma2_weights(xb, xo, 32, sigma2, qw, qo, weight)
    else:
        for i in range(32):
            v = xb[xo + i]
            weight[i] = np.float32(v * v)
    for i in range(32):
        waux[i] = np.float32(np.sqrt(weight[i]))


@njit(cache=True, error_model="numpy")
def _grid_index(L, k, kmap) -> int:
    u = 0
    for i in range(4):
        u |= np.int64(L[4 * k + i]) << (3 * i)
    return kmap[u]


@njit(cache=True, error_model="numpy")
def quantize_block_xxs(xb, xo, row, o, qw, qo, weighted, scratch, Li, bs, tabs) -> bool:
    """quantize_row_iq3_xxs_impl on the super-block xb[xo:xo+256] → row[o:o+98]; False where llama.cpp aborts."""
    grid_pos, grid_l, kmap, nbrs = tabs
    weight, waux, xval, scales = scratch[0], scratch[1], scratch[2], scratch[3]
    L, Laux = Li[0], Li[1]
    on_grid = bs[0]
    on_aux = bs[1]
    for k in range(XXS_BYTES):
        row[o + k] = 0
    ok = True
    max_scale = F0
    sigma2 = twice_mean_square(xb, xo, QK_K)
    for ib in range(8):
        xo32 = xo + 32 * ib
        _prepare(xb, xo32, sigma2, qw, qo + 32 * ib, weighted, weight, waux, xval)
        ss = 0
        for k in range(4):
            nflip = 0
            s = 0
            for i in range(8):
                v = xb[xo32 + 8 * k + i]
                if v >= 0:
                    xval[8 * k + i] = v
                else:
                    xval[8 * k + i] = -v
                    nflip += 1
                    s |= 1 << i
            if nflip % 2:
                imin = 0
                mn = np.float32(np.float32(weight[8 * k] * xb[xo32 + 8 * k]) * xb[xo32 + 8 * k])
                for i in range(1, 8):
                    ax = np.float32(np.float32(weight[8 * k + i] * xb[xo32 + 8 * k + i]) * xb[xo32 + 8 * k + i])
                    if ax < mn:
                        mn = ax
                        imin = i
                xval[8 * k + imin] = -xval[8 * k + imin]
                s ^= 1 << imin
            ss |= (s & 127) << (7 * k)
        mx = xval[0]
        for i in range(1, 32):
            mx = _cmax(mx, xval[i])
        if mx < GROUP_MAX_EPS_IQ3_XXS:
            scales[ib] = F0  # codes and signs stay 0
            continue
        scale, f = _sub_block(weight, waux, xval, L, Laux, on_grid, on_aux, True,
                              grid_pos, grid_l, kmap, nbrs)
        ok &= f
        if scale < F0:
            scale = -scale
            ss = (~ss) & 0x0FFFFFFF  # each 7-bit pattern inverted
        for k in range(8):
            row[o + XXS_QS + 8 * ib + k] = _grid_index(L, k, kmap)
        p = o + XXS_SS + 4 * ib
        for k in range(4):
            row[p + k] = (ss >> (8 * k)) & 0xFF
        ok &= scale >= F0
        scales[ib] = scale
        max_scale = _cmax(max_scale, scale)
    if max_scale == F0:  # C: if (!max_scale), NaN excluded
        for k in range(XXS_BYTES):
            row[o + k] = 0
        return ok
    d = np.float32(max_scale / np.float32(31.0))
    store_fp16(row, o + XXS_D, np.float32(d * np.float32(1.0125)))
    idv = np.float32(F1 / d)
    for ib in range(8):
        l = ggml_nearest_int(np.float32(F05 * np.float32(np.float32(idv * scales[ib]) - F1)))
        l = 0 if l < 0 else (15 if l > 15 else l)
        row[o + XXS_SS + 4 * ib + 3] |= l << 4
    return ok


@njit(cache=True, error_model="numpy")
def quantize_block_s(xb, xo, row, o, qw, qo, weighted, scratch, Li, bs, tabs) -> bool:
    """quantize_row_iq3_s_impl on the super-block xb[xo:xo+256] → row[o:o+110]; False where llama.cpp aborts."""
    grid_pos, grid_l, kmap, nbrs = tabs
    weight, waux, xval, scales = scratch[0], scratch[1], scratch[2], scratch[3]
    L, Laux = Li[0], Li[1]
    on_grid = bs[0]
    on_aux = bs[1]
    for k in range(S_BYTES):
        row[o + k] = 0
    ok = True
    max_scale = F0
    sigma2 = twice_mean_square(xb, xo, QK_K)
    nw = 0  # 32-weight blocks written: C advances qs and signs only past non-zero ones
    for ib in range(8):
        xo32 = xo + 32 * ib
        _prepare(xb, xo32, sigma2, qw, qo + 32 * ib, weighted, weight, waux, xval)
        sg = 0
        for i in range(32):
            v = xb[xo32 + i]
            if v >= 0:
                xval[i] = v
            else:
                xval[i] = -v
                sg |= 1 << i
        mx = xval[0]
        for i in range(1, 32):
            mx = _cmax(mx, xval[i])
        if mx == F0:
            scales[ib] = F0
            continue
        scale, f = _sub_block(weight, waux, xval, L, Laux, on_grid, on_aux, False,
                              grid_pos, grid_l, kmap, nbrs)
        ok &= f
        if scale < F0:
            scale = -scale
            sg = (~sg) & 0xFFFFFFFF
        for k in range(8):
            gi = _grid_index(L, k, kmap)
            row[o + S_QS + 8 * nw + k] = gi & 255
            row[o + S_QH + ib] |= (gi >> 8) << k
        for k in range(4):
            row[o + S_SIGNS + 4 * nw + k] = (sg >> (8 * k)) & 0xFF
        nw += 1
        ok &= scale >= F0
        scales[ib] = scale
        max_scale = _cmax(max_scale, scale)
    if max_scale == F0:
        return ok
    d = np.float32(max_scale / np.float32(31.0))
    store_fp16(row, o + S_D, np.float32(d * np.float32(1.033)))
    idv = np.float32(F1 / d)
    for ib in range(0, 8, 2):
        l1 = ggml_nearest_int(np.float32(F05 * np.float32(np.float32(idv * scales[ib]) - F1)))
        l1 = 0 if l1 < 0 else (15 if l1 > 15 else l1)
        l2 = ggml_nearest_int(np.float32(F05 * np.float32(np.float32(idv * scales[ib + 1]) - F1)))
        l2 = 0 if l2 < 0 else (15 if l2 > 15 else l2)
        row[o + S_SCALES + ib // 2] = l1 | (l2 << 4)
    return ok


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_rows(x, out, qw, weighted, xxs, grid_pos, grid_l, kmap, nbrs, ok):
    """Either impl over rows, parallel over rows; ok[r] False where llama.cpp aborts on row r."""
    nb = x.shape[1] // QK_K
    bb = XXS_BYTES if xxs else S_BYTES
    tabs = (grid_pos, grid_l, kmap, nbrs)
    for r in prange(x.shape[0]):
        scratch = np.empty((4, 32), dtype=np.float32)
        Li = np.empty((2, 32), dtype=np.int32)
        bs = np.empty((2, 8), dtype=np.bool_)
        good = True
        for b in range(nb):
            if xxs:
                good &= quantize_block_xxs(x[r], b * QK_K, out[r], b * bb, qw, b * QK_K, weighted, scratch, Li, bs,
                                           tabs)
            else:
                good &= quantize_block_s(x[r], b * QK_K, out[r], b * bb, qw, b * QK_K, weighted, scratch, Li, bs,
                                         tabs)
        ok[r] = good


_NO_WEIGHTS = np.zeros(1, dtype=np.float32)


def _run(x: np.ndarray, out: np.ndarray, qw: np.ndarray | None, xxs: bool) -> np.ndarray:
    grid_pos, grid_l, kmap, nbrs = tables(256 if xxs else 512)
    ok = np.empty(x.shape[0], dtype=np.bool_)
    _quantize_rows(x, out, _NO_WEIGHTS if qw is None else qw, qw is not None, xxs, grid_pos, grid_l, kmap, nbrs, ok)
    return ok


def quantize_iq3_xxs(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_iq3_xxs_impl without weights: x float32 (rows, cols) → out uint8 (rows, cols/256*98)."""
    _run(x, out, None, True)


def quantize_iq3_xxs_weighted(x: np.ndarray, out: np.ndarray, qw: np.ndarray) -> None:
    """quantize_row_iq3_xxs_impl with an importance per column qw float32 (cols,)."""
    _run(x, out, qw, True)


def quantize_iq3_s(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_iq3_s_impl without weights: x float32 (rows, cols) → out uint8 (rows, cols/256*110)."""
    _run(x, out, None, False)


def quantize_iq3_s_weighted(x: np.ndarray, out: np.ndarray, qw: np.ndarray) -> None:
    """quantize_row_iq3_s_impl with an importance per column qw float32 (cols,)."""
    _run(x, out, qw, False)


def llama_cpp_aborts(ggml_type: GGMLType, x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Which rows of x (with importance qw, or None) llama.cpp's quantizer of ggml_type aborts on (its
    GGML_ASSERTs), bool (rows,); qtool quantizes them all (see the module docstring)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1] // QK_K * block(ggml_type)[1]), dtype=np.uint8)
    qw = None if qw is None else np.ascontiguousarray(qw, dtype=np.float32)
    return ~_run(x, out, qw, ggml_type == GGMLType.IQ3_XXS)


# ---- dequantize (dequantize_row_iq3_xxs / iq3_s, as gguf-py) --------------------------------------------------------
@njit(parallel=True, cache=True)
def dequantize_iq3_xxs(q: np.ndarray, out: np.ndarray) -> None:
    """x = (d*(0.5 + s))*0.5 * magnitude * sign, over rows: q uint8 (rows, cols/256*98) → out float32."""
    for r in prange(out.shape[0]):
        row = q[r]
        for b in range(out.shape[1] // QK_K):
            o = b * XXS_BYTES
            d = load_fp16(row, o + XXS_D)
            for ib in range(8):
                p = o + XXS_SS + 4 * ib
                aux = np.uint32(row[p]) | (np.uint32(row[p + 1]) << 8) | (np.uint32(row[p + 2]) << 16) \
                    | (np.uint32(row[p + 3]) << 24)
                db = np.float32(np.float32(d * np.float32(F05 + np.float32(aux >> 28))) * F05)
                for l in range(4):
                    sg = KSIGNS[(aux >> (7 * l)) & 127]
                    for h in range(2):
                        g = row[o + XXS_QS + 8 * ib + 2 * l + h]
                        for j in range(4):
                            v = np.float32(db * XXS_MAG[g, j])
                            e = b * QK_K + 32 * ib + 8 * l + 4 * h + j
                            out[r, e] = np.float32(v * (FM1 if (sg >> (4 * h + j)) & 1 else F1))


@njit(parallel=True, cache=True)
def dequantize_iq3_s(q: np.ndarray, out: np.ndarray) -> None:
    """x = d*(1 + 2s) * magnitude * sign, over rows: q uint8 (rows, cols/256*110) → out float32."""
    for r in prange(out.shape[0]):
        row = q[r]
        for b in range(out.shape[1] // QK_K):
            o = b * S_BYTES
            d = load_fp16(row, o + S_D)
            for ib in range(8):
                sc = (row[o + S_SCALES + ib // 2] >> (4 * (ib % 2))) & 15
                db = np.float32(d * np.float32(1 + 2 * sc))
                qh = row[o + S_QH + ib]
                for k in range(8):
                    g = np.int64(row[o + S_QS + 8 * ib + k]) | ((np.int64(qh) >> k) & 1) << 8
                    sg = row[o + S_SIGNS + 4 * ib + k // 2]
                    for j in range(4):
                        v = np.float32(db * S_MAG[g, j])
                        e = b * QK_K + 32 * ib + 4 * k + j
                        out[r, e] = np.float32(v * (FM1 if (sg >> (4 * (k % 2) + j)) & 1 else F1))


# ---- fused decode kernels (ggml_vec_dot_iq3_xxs_q8_K / iq3_s_q8_K): w (N, block bytes, lanes) planes; xq (T, 256,
# lanes) int16 Q8_K codes; xd (T, lanes) their scales; xb (T, 16, lanes) sums of each 16 codes (unused) -------------
# One lane per super-block, as matvec.py's K-quant kernels. Every 4 weights' dot is exact in int16 (magnitudes
# <= 62 times codes <= 127: at most 31496), each 32 weights' in int32 and so is the super-block's sum of those
# times their scales 2s+1 <= 31 (< 2^26): a block costs one conversion to float32. Grid points come from one
# uint32 per point (a gather per 4 weights); IQ3_XXS's eighth sign is the parity of the seven stored ones, computed
# rather than looked up.

@njit(cache=True, inline="always")
def _u32(w, r, k, b) -> np.uint32:
    return np.uint32(w[r, k, b]) | (np.uint32(w[r, k + 1, b]) << np.uint32(8)) \
        | (np.uint32(w[r, k + 2, b]) << np.uint32(16)) | (np.uint32(w[r, k + 3, b]) << np.uint32(24))


@njit(cache=True, inline="always")
def _signed_dot4(g, sg, sh, xq, t, e, b) -> np.int32:
    """Sum over j < 4 of byte j of g, negated where bit sh + j of sg is set, times xq[t, e + j, b]."""
    s = np.int16(0)
    for j in range(4):
        v = _i16((g >> np.uint32(8 * j)) & np.uint32(255))
        m = _i16(-_i16((sg >> np.uint32(sh + j)) & np.uint32(1)))
        s = _i16(s + _i16(_i16(_i16(v ^ m) - m) * xq[t, e + j, b]))
    return np.int32(s)


@njit(parallel=True, cache=True, fastmath=True)
def mv_iq3_xxs(w, xq, xd, xb, seg, group, out):
    """block_iq3_xxs (98 bytes): d, qs[64] grid indices, scales_and_signs[8]; weight = d*(2s+1)/4 * grid * sign."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                isum = np.int32(0)
                for ib in range(8):
                    aux = _u32(w, r, XXS_SS + 4 * ib, b)
                    s = np.int32(0)
                    for l in range(4):
                        s7 = (aux >> np.uint32(7 * l)) & np.uint32(127)
                        p = s7 ^ (s7 >> np.uint32(4))
                        p ^= p >> np.uint32(2)
                        p ^= p >> np.uint32(1)
                        sg = s7 | ((p & np.uint32(1)) << np.uint32(7))
                        e = 32 * ib + 8 * l
                        g1 = XXS_GRID32[w[r, XXS_QS + 8 * ib + 2 * l, b]]
                        g2 = XXS_GRID32[w[r, XXS_QS + 8 * ib + 2 * l + 1, b]]
                        s += _signed_dot4(g1, sg, 0, xq, t, e, b) + _signed_dot4(g2, sg, 4, xq, t, e + 4, b)
                    isum += np.int32(2 * (aux >> np.uint32(28)) + 1) * s
                acc = _acc(acc, seg[b], xd[t, b] * _f16(w, r, XXS_D, b) * np.float32(isum))
            _put(out, t, r, group, acc, np.float32(0.25))


@njit(parallel=True, cache=True, fastmath=True)
def mv_iq3_s(w, xq, xd, xb, seg, group, out):
    """block_iq3_s (110 bytes): d, qs[64], qh[8], signs[32], scales[4]; weight = d*(2s+1) * grid * sign."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                isum = np.int32(0)
                for ib in range(8):
                    qh = np.uint32(w[r, S_QH + ib, b])
                    s = np.int32(0)
                    for k in range(8):
                        g = S_GRID32[np.uint32(w[r, S_QS + 8 * ib + k, b])
                                     | (((qh >> np.uint32(k)) & np.uint32(1)) << np.uint32(8))]
                        sg = np.uint32(w[r, S_SIGNS + 4 * ib + k // 2, b])
                        s += _signed_dot4(g, sg, 4 * (k % 2), xq, t, 32 * ib + 4 * k, b)
                    sc = (np.uint32(w[r, S_SCALES + ib // 2, b]) >> np.uint32(4 * (ib % 2))) & np.uint32(15)
                    isum += np.int32(2 * sc + 1) * s
                acc = _acc(acc, seg[b], xd[t, b] * _f16(w, r, S_D, b) * np.float32(isum))
            _put(out, t, r, group, acc, ONE)
