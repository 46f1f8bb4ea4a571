"""IQ4_NL and IQ4_XS: 4-bit codes indexing 16 non-uniform levels (iq_grids.kvalues_iq4nl, -127 … 113), x = d*level.

Layouts (ggml's block_iq4_nl, block_iq4_xs, little-endian):

    IQ4_NL  d:fp16  qs[16]                                      32 weights, 18 bytes
    IQ4_XS  d:fp16  scales_h:u16  scales_l[4]  qs[128]         256 weights, 136 bytes

qs holds, per 32 weights, weight j in the low nibble of byte j and weight j+16 in its high nibble. IQ4_XS has 8
sub-blocks of 32 with a 6-bit scale each, ls = (low nibble of scales_l[ib/2] (high nibble for odd ib)) | (bits
2ib, 2ib+1 of scales_h) << 4, and x = (d*(ls - 32)) * level.

Quantization is quantize_row_iq4_nl_impl, which ggml_quantize_chunk runs with ntry 7 for both types, with and
without an importance matrix (quantize_iq4_nl / quantize_iq4_xs). Each sub-block of 32 starts from d = max/127
(max the weight of largest magnitude), then tries the 15 inverse scales (itry - 127)/max, itry = -7..7, keeping
the least-squares scale of the best weighted fit; the weights are x² without an imatrix and qw*sqrtf(sigma2 + x²)
with one (sigma2 = 2*mean x² over the super-block). IQ4_NL stores that scale as d; IQ4_XS quantizes the 8
scales to 6 bits against d = -max_scale/32 (max_scale the scale of largest magnitude). Either way every weight
is then coded again against its final (unrounded float32) scale.

best_index_int8 (the nearest level, a binary search whose last step compares x - lo < hi - x in float32) is
computed here as a count of thresholds: for levels lo < hi the test fl(x - lo) < fl(hi - x) is monotone in x,
so between them it flips at one float32, THRESHOLDS[k] (found once from the levels at import). The index of x is
then the number of thresholds at or below it — the binary search's answer for every x, ±inf included — with
NaN, which the search sends to 15, taken apart. It runs branch-free, so the loops over it vectorize.

Bit-exactness: float32 arithmetic one rounding per operation in C's order (`w*q*x` is (w*q)*x; `-max/values[0]`,
`(itry + values[0])/max` with the int sum exact), no fused multiply-add, ggml's nearest_int for the 6-bit
scales (kquant_common.ggml_nearest_int, past its exact range too). The 16 trials of a sub-block are independent
until one wins, so they are accumulated side by side (one pass over the weights, each sum in C's order) and the
winner is picked afterwards in C's order, as weighted.make_qx_quants_w does.

Fused decode kernels (mv_iq4_nl: Q8_0 activations; mv_iq4_xs: Q8_K activations, as type_traits_cpu has them) read
matvec.py's planes. A lookup in the level table does not vectorize (LLVM loads lane by lane), so the levels come
from a tree of 15 selects on the nibble's bits, run once per row over its flattened planes (one contiguous loop,
full vector width, into int16 scratch) before the dot product reads them like codes: measured on 5632x2048, one
thread, 1.4x (IQ4_NL) and 5x (IQ4_XS, whose 8 super-blocks per row are too few lanes for the tree) faster than
the tree inside the block loop. A level times an activation code reaches 127*127 (|codes| <= 127 on both sides),
so two products sum exactly in int16, the rest in int32.
"""
import numpy as np
from numba import njit, prange

from qtool.formats.constants import QK_K, GGMLType

from .common import load_fp16, store_fp16
from .iq_grids import kvalues_iq4nl
from .kquant_common import ggml_nearest_int, largest_magnitude
from .matvec import ACC0, ONE, _acc, _f16, _i16, _put, _u8
from .traits import block, fields
from .weighted import sigma2_weights, sum_squares

QK4_NL, NL_BYTES = block(GGMLType.IQ4_NL)
XS_BYTES = block(GGMLType.IQ4_XS)[1]
NL_D, NL_QS = fields(GGMLType.IQ4_NL, "d", "qs")
XS_D, XS_SCALES_H, XS_SCALES_L, XS_QS = fields(GGMLType.IQ4_XS, "d", "scales_h", "scales_l", "qs")
SUB = QK4_NL  # 32: weights per sub-block (IQ4_NL's whole block, an eighth of IQ4_XS's)
NSUB = QK_K // SUB
NTRY = 7
NTRIALS = 2 * NTRY + 2  # the first scale max/127, then itry = -7..7
GROUP_MAX_EPS = np.float32(1e-15)
F0 = np.float32(0.0)
F1 = np.float32(1.0)
LEVELS = kvalues_iq4nl.astype(np.float32)
STEPS = np.diff(LEVELS).astype(np.float32)  # level k+1 - level k (exact: small integers)


def _thresholds(levels: np.ndarray) -> np.ndarray:
    """Per pair of neighbouring levels lo < hi, the least float32 x in [lo, hi] where best_index_int8's last
    comparison fl(x - lo) < fl(hi - x) turns false (it is true at lo, false at hi and monotone between)."""
    out = np.empty(levels.size - 1, np.float32)
    with np.errstate(all="ignore"):
        for k in range(levels.size - 1):
            lo, hi = np.float32(levels[k]), np.float32(levels[k + 1])

            def below(x):
                return np.float32(x - lo) < np.float32(hi - x)

            x = np.float32((lo + hi) / np.float32(2))  # within a few ulps of the flip
            while below(x):
                x = np.nextafter(x, hi)
            while not below(np.nextafter(x, lo)):
                x = np.nextafter(x, lo)
            out[k] = x
    return out


THRESHOLDS = _thresholds(LEVELS)
N_THRESH = THRESHOLDS.size  # 15
LAST = np.int32(N_THRESH)  # the index best_index_int8 gives NaN
LAST_LEVEL = LEVELS[-1]


# ---- the nearest level (best_index_int8) -----------------------------------------------------------------------
@njit(cache=True, inline="always", error_model="numpy")
def best_index(x: np.float32) -> np.int32:
    """best_index_int8(16, kvalues_iq4nl, x)."""
    l = np.int32(0)
    for k in range(N_THRESH):
        l += np.int32(1) if x >= THRESHOLDS[k] else np.int32(0)
    return l if x == x else LAST


@njit(cache=True, inline="always", error_model="numpy")
def nearest_level(x: np.float32) -> np.float32:
    """kvalues_iq4nl[best_index_int8(16, kvalues_iq4nl, x)] as float32, without the lookup."""
    q = LEVELS[0]
    for k in range(N_THRESH):
        q += STEPS[k] if x >= THRESHOLDS[k] else F0
    return q if x == x else LAST_LEVEL


@njit(cache=True, error_model="numpy")
def best_index_ref(x: np.float32) -> int:
    """best_index_int8 transcribed (the binary search), for the tests."""
    if x <= LEVELS[0]:
        return 0
    if x >= LEVELS[15]:
        return 15
    ml = 0
    mu = 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < LEVELS[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if np.float32(x - LEVELS[mu - 1]) < np.float32(LEVELS[mu] - x) else mu


# ---- quantize_row_iq4_nl_impl ----------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def subblock_scale(x, o: int, w, ts) -> np.float32:
    """The scale quantize_row_iq4_nl_impl searches for the sub-block x[o:o+32] with weights w[:32] (ntry 7);
    0 when its largest magnitude is below GROUP_MAX_EPS. ts: float32 (3*NTRIALS,) scratch (the trials' inverse
    scales and sums, side by side)."""
    amax, mx = largest_magnitude(x[o:o + SUB], SUB)
    if amax < GROUP_MAX_EPS:
        return F0
    nt = ts.shape[0] // 3  # NTRIALS, opaque to LLVM (a known count would be unrolled into scalar code)
    ts[0] = np.float32(F1 / np.float32(np.float32(-mx) / LEVELS[0]))
    for t in range(1, nt):
        ts[t] = np.float32(np.float32(t - 1 - NTRY + kvalues_iq4nl[0]) / mx)
    for t in range(nt, 3 * nt):
        ts[t] = F0
    for j in range(SUB):
        xj = x[o + j]
        wj = w[j]
        for t in range(nt):
            q = nearest_level(np.float32(ts[t] * xj))
            wq = np.float32(wj * q)
            ts[nt + t] = np.float32(ts[nt + t] + np.float32(wq * xj))
            ts[2 * nt + t] = np.float32(ts[2 * nt + t] + np.float32(wq * q))
    sumqx = ts[nt]
    sumq2 = ts[2 * nt]
    d = np.float32(sumqx / sumq2) if sumq2 > F0 else F0
    best = np.float32(d * sumqx)
    for t in range(1, nt):
        sumqx = ts[nt + t]
        sumq2 = ts[2 * nt + t]
        if sumq2 > F0 and np.float32(sumqx * sumqx) > np.float32(best * sumq2):
            d = np.float32(sumqx / sumq2)
            best = np.float32(d * sumqx)
    return d


@njit(cache=True, inline="always", error_model="numpy")
def _weights(x, o: int, n: int, sigma2, qw, wo: int, weighted: bool, w) -> None:
    """The fit's weights of x[o:o+n] into w[:n]: qw*sqrtf(sigma2 + x²) with an importance matrix, else x²."""
    if weighted:
        sigma2_weights(x, o, n, sigma2, qw, wo, w)
    else:
        for j in range(n):
            w[j] = np.float32(x[o + j] * x[o + j])


@njit(cache=True, inline="always", error_model="numpy")
def _codes(x, o: int, inv, L, lo: int) -> None:
    """best_index_int8 of inv*x[o+j] into L[lo+j], j < 32."""
    # 32 (L holds whole sub-blocks) as a run-time count: a known 32 would be unrolled into scalar code, not vectorized
    n = L.shape[0] // (L.shape[0] // SUB)
    for j in range(n):
        L[lo + j] = np.uint8(best_index(np.float32(inv * x[o + j])))


@njit(cache=True, inline="always")
def _pack(L, lo: int, row, o: int) -> None:
    """Codes L[lo:lo+32] → 16 bytes row[o:o+16]: weight j low nibble, weight j+16 high nibble."""
    for j in range(SUB // 2):
        row[o + j] = np.uint8(L[lo + j] | (L[lo + 16 + j] << 4))


@njit(cache=True, inline="always", error_model="numpy")
def _sigma2(x, o: int, n: int) -> np.float32:
    # C: sigma2 = sum x²; sigma2 *= 2.f/n (a power of two: exact, and no overflow from doubling first)
    return np.float32(sum_squares(x, o, n) * np.float32(2.0 / n))


@njit(cache=True, inline="always", error_model="numpy")
def quantize_row_nl(xr, row, qw, weighted: bool) -> None:
    """One row of IQ4_NL blocks (quantize_iq4_nl's loop; qw the row's importance when weighted)."""
    w = np.empty(SUB, np.float32)
    ts = np.empty(3 * NTRIALS, np.float32)
    L = np.empty(SUB, np.uint8)
    for b in range(xr.shape[0] // SUB):
        o = b * SUB
        _weights(xr, o, SUB, _sigma2(xr, o, SUB), qw, o, weighted, w)
        d = subblock_scale(xr, o, w, ts)
        ob = b * NL_BYTES
        store_fp16(row, ob + NL_D, d)
        inv = np.float32(F1 / d) if d != F0 else F0  # C: scales[0] ? 1/scales[0] : 0 (NaN is true)
        _codes(xr, o, inv, L, 0)
        _pack(L, 0, row, ob + NL_QS)


@njit(cache=True, inline="always", error_model="numpy")
def quantize_row_xs(xr, row, qw, weighted: bool) -> None:
    """One row of IQ4_XS super-blocks (quantize_iq4_xs's loop)."""
    w = np.empty(SUB, np.float32)
    ts = np.empty(3 * NTRIALS, np.float32)
    L = np.empty(QK_K, np.uint8)
    scales = np.empty(NSUB, np.float32)
    for b in range(xr.shape[0] // QK_K):
        o = b * QK_K
        sigma2 = _sigma2(xr, o, QK_K)
        amax_scale = F0
        max_scale = F0
        for ib in range(NSUB):
            _weights(xr, o + SUB * ib, SUB, sigma2, qw, o + SUB * ib, weighted, w)
            s = subblock_scale(xr, o + SUB * ib, w, ts)
            scales[ib] = s
            if abs(s) > amax_scale:
                amax_scale = abs(s)
                max_scale = s
        ob = b * XS_BYTES
        d = np.float32(-max_scale / np.float32(32.0))
        store_fp16(row, ob + XS_D, d)
        inv = np.float32(F1 / d) if d != F0 else F0
        scales_h = 0
        for ib in range(NSUB):
            l = ggml_nearest_int(np.float32(inv * scales[ib]))
            l = max(-32, min(31, l))
            dl = np.float32(d * np.float32(l))
            _codes(xr, o + SUB * ib, np.float32(F1 / dl) if dl != F0 else F0, L, SUB * ib)
            l += 32
            if ib % 2 == 0:
                row[ob + XS_SCALES_L + ib // 2] = np.uint8(l & 15)
            else:
                row[ob + XS_SCALES_L + ib // 2] |= np.uint8((l & 15) << 4)
            scales_h |= (l >> 4) << (2 * ib)
        row[ob + XS_SCALES_H] = np.uint8(scales_h & 0xFF)
        row[ob + XS_SCALES_H + 1] = np.uint8(scales_h >> 8)
        for ib in range(NSUB):
            _pack(L, SUB * ib, row, ob + XS_QS + 16 * ib)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_iq4_nl(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_iq4_nl without an importance matrix over rows: x float32 (rows, cols) → out (rows, cols/32*18)."""
    for r in prange(x.shape[0]):
        quantize_row_nl(x[r], out[r], x[r], False)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_iq4_nl_weighted(x: np.ndarray, out: np.ndarray, qw: np.ndarray) -> None:
    """quantize_iq4_nl with importance qw float32 (cols,)."""
    for r in prange(x.shape[0]):
        quantize_row_nl(x[r], out[r], qw, True)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_iq4_xs(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_iq4_xs without an importance matrix: x float32 (rows, cols) → out (rows, cols/256*136)."""
    for r in prange(x.shape[0]):
        quantize_row_xs(x[r], out[r], x[r], False)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_iq4_xs_weighted(x: np.ndarray, out: np.ndarray, qw: np.ndarray) -> None:
    """quantize_iq4_xs with importance qw float32 (cols,)."""
    for r in prange(x.shape[0]):
        quantize_row_xs(x[r], out[r], qw, True)


# ---- dequantize_row_iq4_nl / _xs: x = d * level (IQ4_XS: (d * (ls - 32)) * level), as ggml and gguf-py -----------
@njit(cache=True, inline="always")
def _dequantize32(row, qs: int, d, y, yo: int) -> None:
    for j in range(SUB // 2):
        v = row[qs + j]
        y[yo + j] = np.float32(d * LEVELS[v & 15])
        y[yo + 16 + j] = np.float32(d * LEVELS[v >> 4])


@njit(parallel=True, cache=True)
def dequantize_iq4_nl(q: np.ndarray, out: np.ndarray) -> None:
    """q uint8 (rows, cols/32*18) → out float32 (rows, cols)."""
    for r in prange(out.shape[0]):
        for b in range(out.shape[1] // SUB):
            ob = b * NL_BYTES
            _dequantize32(q[r], ob + NL_QS, load_fp16(q[r], ob + NL_D), out[r], b * SUB)


@njit(parallel=True, cache=True)
def dequantize_iq4_xs(q: np.ndarray, out: np.ndarray) -> None:
    """q uint8 (rows, cols/256*136) → out float32 (rows, cols)."""
    for r in prange(out.shape[0]):
        row = q[r]
        for b in range(out.shape[1] // QK_K):
            ob = b * XS_BYTES
            d = load_fp16(row, ob + XS_D)
            h = np.int32(row[ob + XS_SCALES_H]) | (np.int32(row[ob + XS_SCALES_H + 1]) << 8)
            for ib in range(NSUB):
                ls = ((np.int32(row[ob + XS_SCALES_L + ib // 2]) >> (4 * (ib % 2))) & 15) | (((h >> (2 * ib)) & 3) << 4)
                dl = np.float32(d * np.float32(ls - 32))
                _dequantize32(row, ob + XS_QS + 16 * ib, dl, out[r], b * QK_K + SUB * ib)


# ---- fused decode kernels (matvec.py's planes: w (N, block bytes, lanes), blocks last) ----------------------------
K = tuple(int(v) for v in kvalues_iq4nl)  # _level's constants


@njit(cache=True, inline="always")
def _level(v) -> np.int16:
    """kvalues_iq4nl[v & 15] as a tree of selects on the nibble's bits: it vectorizes over the blocks, where a
    lookup in the table becomes one scalar load per lane."""
    b0 = _i16(v & 1) != 0  # tested as int16, so that the masks are as wide as the int16 products' lanes
    b1 = _i16(v & 2) != 0
    b2 = _i16(v & 4) != 0
    b3 = _i16(v & 8) != 0
    p0 = np.int16(K[1]) if b0 else np.int16(K[0])
    p1 = np.int16(K[3]) if b0 else np.int16(K[2])
    p2 = np.int16(K[5]) if b0 else np.int16(K[4])
    p3 = np.int16(K[7]) if b0 else np.int16(K[6])
    p4 = np.int16(K[9]) if b0 else np.int16(K[8])
    p5 = np.int16(K[11]) if b0 else np.int16(K[10])
    p6 = np.int16(K[13]) if b0 else np.int16(K[12])
    p7 = np.int16(K[15]) if b0 else np.int16(K[14])
    q0 = p1 if b1 else p0
    q1 = p3 if b1 else p2
    q2 = p5 if b1 else p4
    q3 = p7 if b1 else p6
    r0 = q1 if b2 else q0
    r1 = q3 if b2 else q2
    return r1 if b3 else r0


ROW_CHUNKS = 256  # units of work of the fused kernels: runs of rows sharing one scratch buffer


@njit(cache=True, inline="always")
def _decode_levels(src, lo, hi) -> None:
    """The levels of the nibbles of src (uint8, part of a row's flattened planes) into lo (low nibbles) and hi
    (high ones): one loop over contiguous bytes, as wide as the vectors go (1-D arrays: with 2-D ones LLVM
    leaves it scalar)."""
    for i in range(lo.shape[0]):
        v = src[i]
        lo[i] = _level(v)
        hi[i] = _level(v >> 4)


@njit(parallel=True, cache=True, fastmath=True)
def mv_iq4_nl(w, xq, xd, xsum, seg, group, out):
    """block_iq4_nl against Q8_0 activations (xsum unused: the levels have no offset to move out)."""
    N, nbytes, nbp = w.shape
    T = xq.shape[0]
    n_work = min(N, ROW_CHUNKS)
    nq = (SUB // 2) * nbp
    for c in prange(n_work):
        lv_lo = np.empty(nq, np.int16)
        lv_hi = np.empty(nq, np.int16)
        for r in range(c * N // n_work, (c + 1) * N // n_work):
            wr = w[r].reshape(nbytes * nbp)
            _decode_levels(wr[NL_QS * nbp:NL_QS * nbp + nq], lv_lo, lv_hi)
            for t in range(T):
                acc = ACC0
                for b in range(nbp):
                    s = np.int32(0)
                    for j in range(16):
                        s = np.int32(s + _i16(_i16(lv_lo[j * nbp + b] * xq[t, j, b])
                                              + _i16(lv_hi[j * nbp + b] * xq[t, 16 + j, b])))
                    acc = _acc(acc, seg[b], _f16(w, r, NL_D, b) * xd[t, b] * np.float32(s))
                _put(out, t, r, group, acc, ONE)


@njit(parallel=True, cache=True, fastmath=True)
def mv_iq4_xs(w, xq, xd, xb, seg, group, out):
    """block_iq4_xs against Q8_K activations: per sub-block of 32, (ls - 32) times its integer dot.

    A row has few super-blocks (8 for 2048 weights), too few lanes for the select tree of _level to pay, so each
    row's levels are decoded first over its flattened planes (128 * lanes bytes in one contiguous loop) into
    int16 scratch, and the dot then reads them as mv_q8_0 reads its codes."""
    N, nbytes, nbp = w.shape
    T = xq.shape[0]
    n_work = min(N, ROW_CHUNKS)
    nq = (QK_K // 2) * nbp
    for c in prange(n_work):
        lv_lo = np.empty(nq, np.int16)
        lv_hi = np.empty(nq, np.int16)
        for r in range(c * N // n_work, (c + 1) * N // n_work):
            wr = w[r].reshape(nbytes * nbp)
            _decode_levels(wr[XS_QS * nbp:XS_QS * nbp + nq], lv_lo, lv_hi)
            for t in range(T):
                acc = ACC0
                for b in range(nbp):
                    h = np.uint16(w[r, XS_SCALES_H, b]) | (np.uint16(w[r, XS_SCALES_H + 1, b]) << np.uint16(8))
                    isum = F0
                    for ib in range(NSUB):
                        lo = (w[r, XS_SCALES_L + ib // 2, b] >> (4 * (ib % 2))) & 15
                        ls = _u8(lo | (((h >> (2 * ib)) & 3) << 4)) - np.float32(32.0)
                        s = np.int32(0)
                        for j in range(16):
                            k = (16 * ib + j) * nbp + b
                            s = np.int32(s + _i16(_i16(lv_lo[k] * xq[t, SUB * ib + j, b])
                                                  + _i16(lv_hi[k] * xq[t, SUB * ib + 16 + j, b])))
                        isum += ls * np.float32(s)
                    acc = _acc(acc, seg[b], xd[t, b] * _f16(w, r, XS_D, b) * isum)
                _put(out, t, r, group, acc, ONE)
