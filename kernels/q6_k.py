"""Q6_K: super-blocks of 256 weights in 16 sub-blocks of 16, x = (d*sc)*(q - 32) (ggml's block_q6_K).

Layout (210 bytes, little-endian): ql[128] @0, qh[64] @128, scales[16] (int8) @192, d:fp16 @208. For each half
of 128 weights (h = 0, 1) and l < 32, with codes q = 0..63 of weights h*128 + l + 32*k (k = 0..3):
ql[64h + l] = lo4(q0) | lo4(q2) << 4, ql[64h + 32 + l] = lo4(q1) | lo4(q3) << 4,
qh[32h + l] = hi2(q0) | hi2(q1) << 2 | hi2(q2) << 4 | hi2(q3) << 6.

Quantization is quantize_row_q6_K_ref (what ggml_quantize_chunk runs without an importance matrix): each
sub-block's scale comes from make_qx_quants(nmax 32, rmse_type 1: weights x*x, 19 trial scales), the 16 scales
are quantized to int8 against a fp16 super-scale, then every weight is requantized with its final scale.

Bit-exactness: float32 arithmetic in C's order (see kquant_common), ggml's nearest_int including its behaviour
outside ±4194303, C's int8_t truncation of the scales.

Speed: make_qx_quants runs on the 64 sub-blocks of GROUP super-blocks at once, one per lane, every loop over the
lanes vectorised by LLVM; its 19 trial scales are independent, the winner is picked afterwards in C's order and
its codes are only recomputed where C keeps them (sub-blocks whose int8 scale is 0). A super-block holding inf or
NaN is done by the plain transcription `quantize_block_ref`, a requantization beyond nearest_int's exact range by
ggml_nearest_int. `quantize_block_ref` is the transcription alone (the tests run it block by block). See q3_k
for what LLVM needs to vectorise these loops.

Q3_K's search is this one's sibling (16-weight sub-blocks as lanes, rmse weights x*x): the parts they share are
kquant_common's gather_subblocks16, lane_weights16 and largest_magnitude; what stays alike is
the shape of the lane loops around two different searches (make_q3_quants' passes, make_qx_quants' trials).
"""
import numpy as np
from numba import njit, prange

from qtool.formats.constants import GGMLType

from .common import load_fp16, store_fp16
from .kquant_common import (MAGIC, NEAREST_INT_SAFE, QK_K, ggml_nearest_int,
                            gather_subblocks16, lane_weights16, largest_magnitude)
from .traits import block, fields
from .weighted import QX_SCRATCH, make_qx_quants_w, make_qx_quants_w_ref

BLOCK_BYTES = block(GGMLType.Q6_K)[1]
QL, QH, SCALES, D = fields(GGMLType.Q6_K, "ql", "qh", "scales", "d")
NMAX = 32
NSUB = QK_K // 16  # sub-blocks of 16 weights
NTRY = 19  # make_qx_quants' first scale, then is = -9..-1, 1..9
GROUP_MAX_EPS = np.float32(1e-15)
F0 = np.float32(0.0)
F1 = np.float32(1.0)
TENTH = np.float32(0.1)


@njit(cache=True, inline="always", error_model="numpy")
def _clamp(l: int, lo: int, hi: int) -> int:
    return lo if l < lo else (hi if l > hi else l)


@njit(cache=True, error_model="numpy")
def make_qx_quants(x, nmax: int, L) -> np.float32:
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL), plainly transcribed.

    Codes nmax + clamp(l, -nmax, nmax-1) go to L[:n] (0 for an all-zero group); returns the scale
    (x ≈ scale*(L-nmax)).
    """
    n = x.shape[0]
    w = np.empty(n, dtype=np.float32)  # rmse_type 1 without quant_weights: weights x*x
    for i in range(n):
        w[i] = np.float32(x[i] * x[i])
    return make_qx_quants_w_ref(x, 0, n, nmax, L, 0, w, 0)


@njit(cache=True, error_model="numpy")
def _pack(row, o: int, L, tmp) -> None:
    """Codes L[:256] (0..63) → ql, qh (row[o:o+192]). tmp: uint8 (192,) scratch; packing there first and
    copying lets LLVM vectorise (it cannot tell that row and L do not overlap)."""
    n = L.shape[0] // 8  # 32, run-time
    for h in range(2):
        b = 128 * h
        for l in range(n):
            q0 = np.int32(L[b + l])
            q1 = np.int32(L[b + l + 32])
            q2 = np.int32(L[b + l + 64])
            q3 = np.int32(L[b + l + 96])
            tmp[QL + 64 * h + l] = (q0 & 0xF) | ((q2 & 0xF) << 4)
            tmp[QL + 64 * h + l + 32] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            tmp[QH + 32 * h + l] = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6)
    for k in range(tmp.shape[0]):
        row[o + k] = tmp[k]


@njit(cache=True, error_model="numpy")
def _finish_scales(row, o: int, scales):
    """Quantize the 16 sub-block scales to int8 with the fp16 super-scale d; returns (d as float32, False), or
    (0, True) when the whole block was written as zeros (all scales below GROUP_MAX_EPS)."""
    max_abs, max_scale = largest_magnitude(scales, NSUB)
    if max_abs < GROUP_MAX_EPS:
        for k in range(BLOCK_BYTES):
            row[o + k] = 0
        return F0, True
    iscale = np.float32(np.float32(-128.0) / max_scale)
    d = store_fp16(row, o + D, np.float32(F1 / iscale))
    for j in range(NSUB):
        row[o + SCALES + j] = min(127, ggml_nearest_int(np.float32(iscale * scales[j]))) & 0xFF
    return d, False


@njit(cache=True, inline="always", error_model="numpy")
def _requantize_pack(xb, row, o: int, L, dall) -> None:
    """The end of quantize_row_q6_K_ref and _impl: each weight of xb[:256] requantized against its sub-block's
    8-bit scale (a sub-block whose scale is 0 keeps the search's codes, as C does), then packed into row[o:].
    L: uint8 (448,) scratch holding the codes."""
    for j in range(NSUB):
        d = np.float32(dall * np.float32(np.int8(row[o + SCALES + j])))
        if d == F0:
            continue
        for i in range(16):
            L[16 * j + i] = _clamp(ggml_nearest_int(np.float32(xb[16 * j + i] / d)), -32, 31) + 32
    _pack(row, o, L[:QK_K], L[QK_K:QK_K + SCALES])


@njit(cache=True, error_model="numpy")
def quantize_block_ref(xb, row, o: int, L) -> None:
    """quantize_row_q6_K_ref on one super-block xb[:256] → row[o:o+210], plainly transcribed (L: uint8 (448,)
    scratch)."""
    scales = np.empty(NSUB, dtype=np.float32)
    for j in range(NSUB):
        scales[j] = make_qx_quants(xb[16 * j:16 * j + 16], NMAX, L[16 * j:16 * j + 16])
    dall, zero = _finish_scales(row, o, scales)
    if zero:
        return
    _requantize_pack(xb, row, o, L, dall)


# ---- fast path: the sub-blocks of GROUP super-blocks as lanes -------------------------------------------------
# Lane j = 16*g + s is sub-block s of super-block g of the group. Scratch per worker, flat float32 arrays indexed
# with the compile-time LANES (so LLVM sees constant offsets from one base and needs no run-time alias checks):
#   xs[(3*i + k)*LANES + j]: weight i of lane j (k=0), w = x*x (k=1), w*x (k=2);
#   ts[(k*NTRY + t)*LANES + j]: iscale (k=0), sum of w*x*l (k=1), sum of w*l*l (k=2), their ratio, the scale
#   (k=3) and scale * sum w*x*l (k=4) of trial t;
#   vec[k*LANES + j]: per-lane values, k below.
# Loops run over lanes (vectorised) outside and over weights or trials inside (unrolled, values in registers).

GROUP = 4  # super-blocks per group
LANES = NSUB * GROUP
_ALIVE, _BAD, _SCALE, _WISC, _DL = range(5)
NVEC = 5


@njit(cache=True, error_model="numpy")
def _lanes_prepare(xs, ts, vec) -> None:
    """w = x*x and w*x, each lane's max |x| (the first one wins, as C), inf/NaN flags, the 19 iscales."""
    nl = vec.shape[0] // NVEC  # LANES, as a run-time trip count
    fnmax = np.float32(NMAX)
    for j in range(nl):
        amax, mx, bad = lane_weights16(xs, j, LANES)
        a = (amax >= GROUP_MAX_EPS) & (bad == F0)
        vec[_ALIVE * LANES + j] = F1 if a else F0
        vec[_BAD * LANES + j] = bad
        m = mx if a else F1
        ts[j] = np.float32(-fnmax / m)
        for t in range(1, NTRY):
            s = np.float32(t - 10 if t < 10 else t - 9)
            ts[t * LANES + j] = np.float32(-np.float32(fnmax + np.float32(TENTH * s)) / m)


@njit(cache=True, error_model="numpy")
def _lanes_sums(xs, ts) -> None:
    """For every trial t and lane j: sums of w*x*l and w*l*l, l = clamp(nearest_int(iscale*x), -32, 31), in C's
    order (|iscale*x| <= 33 for finite weights, so nearest_int is the plain 1.5*2^23 rounding)."""
    nl = ts.shape[0] // (5 * NTRY)
    lo = np.float32(-NMAX)
    hi = np.float32(NMAX - 1)
    for t in range(NTRY):
        for j in range(nl):
            isc = ts[t * LANES + j]
            s1 = F0
            s2 = F0
            for i in range(16):
                x = xs[3 * i * LANES + j]
                r = np.float32(np.float32(np.float32(isc * x) + MAGIC) - MAGIC)
                r = r if r > lo else lo
                r = r if r < hi else hi
                s1 = np.float32(s1 + np.float32(xs[(3 * i + 2) * LANES + j] * r))
                s2 = np.float32(s2 + np.float32(np.float32(xs[(3 * i + 1) * LANES + j] * r) * r))
            ts[(NTRY + t) * LANES + j] = s1
            ts[(2 * NTRY + t) * LANES + j] = s2


@njit(cache=True, error_model="numpy")
def _lanes_pick(ts, vec) -> None:
    """make_qx_quants' choice among the trials, in C's order: the scale and the iscale its codes came from.
    Each trial's scale s1/s2 and its `best` (s1/s2)*s1 are computed first (ts planes 3, 4), so the sequential
    choice itself is only compares and selects."""
    nl = vec.shape[0] // NVEC
    for t in range(NTRY):
        for j in range(nl):
            s1 = ts[(NTRY + t) * LANES + j]
            sc = np.float32(s1 / ts[(2 * NTRY + t) * LANES + j])
            ts[(3 * NTRY + t) * LANES + j] = sc
            ts[(4 * NTRY + t) * LANES + j] = np.float32(sc * s1)
    for j in range(nl):
        s1 = ts[NTRY * LANES + j]
        s2 = ts[2 * NTRY * LANES + j]
        z = s2 != F0  # C: suml2 ? sumlx/suml2 : 0 (NaN counts as true)
        sc = ts[3 * NTRY * LANES + j]
        bt = ts[4 * NTRY * LANES + j]
        scale = sc if z else F0
        best = bt if z else np.float32(F0 * s1)
        wisc = ts[j]
        for t in range(1, NTRY):  # loads first: a load inside a select would become a masked load
            s1 = ts[(NTRY + t) * LANES + j]
            s2 = ts[(2 * NTRY + t) * LANES + j]
            sc = ts[(3 * NTRY + t) * LANES + j]
            bt = ts[(4 * NTRY + t) * LANES + j]
            isc = ts[t * LANES + j]
            up = (s2 > F0) & (np.float32(s1 * s1) > np.float32(best * s2))
            scale = sc if up else scale
            best = bt if up else best
            wisc = isc if up else wisc
        vec[_SCALE * LANES + j] = scale if vec[_ALIVE * LANES + j] != F0 else F0
        vec[_WISC * LANES + j] = wisc


@njit(cache=True, error_model="numpy")
def _block_codes(xb, L, vec, j0: int) -> None:
    """Final codes 0..63 of one super-block (lanes j0 .. j0+15) into L[:256], in natural order:
    clamp(nearest_int(x/dl), -32, 31) + 32 where dl = d*sc != 0, else make_qx_quants' own codes (from the
    winning iscale; 0 for all-zero sub-blocks)."""
    n = L.shape[0] // NSUB  # 16, as a run-time trip count: the loops over it are vectorised
    lo = np.float32(-NMAX)
    hi = np.float32(NMAX - 1)
    for s in range(NSUB):
        d = vec[_DL * LANES + j0 + s]
        if d != F0:
            ok = True
            for i in range(n):
                v = np.float32(xb[16 * s + i] / d)
                ok &= abs(v) <= NEAREST_INT_SAFE
                r = np.float32(np.float32(v + MAGIC) - MAGIC)
                r = r if r > lo else lo
                r = r if r < hi else hi
                L[16 * s + i] = np.uint8(np.int32(r) + NMAX)
            if not ok:  # |x/dl| beyond nearest_int's exact range, or NaN (written out as in q3_k, which says why)
                for i in range(n):
                    L[16 * s + i] = _clamp(ggml_nearest_int(np.float32(xb[16 * s + i] / d)), -32, 31) + 32
        elif vec[_ALIVE * LANES + j0 + s] != F0:
            isc = vec[_WISC * LANES + j0 + s]
            for i in range(n):
                r = np.float32(np.float32(np.float32(isc * xb[16 * s + i]) + MAGIC) - MAGIC)
                r = r if r > lo else lo
                r = r if r < hi else hi
                L[16 * s + i] = np.uint8(np.int32(r) + NMAX)
        else:
            for i in range(n):
                L[16 * s + i] = 0


@njit(cache=True, error_model="numpy")
def quantize_group(x, out, k0: int, cnt: int, xs, ts, vec, Lu) -> None:
    """quantize_row_q6_K_ref on super-blocks k0 .. k0+cnt-1 (cnt <= GROUP) of x (counted row after row) → out.
    Scratch: xs float32 (48*LANES,), ts float32 (5*NTRY*LANES,), vec float32 (NVEC*LANES,), Lu uint8 (448,).
    Super-blocks holding inf or NaN go through quantize_block_ref."""
    nb = x.shape[1] // QK_K
    gather_subblocks16(x, k0, cnt, xs, GROUP, LANES)
    _lanes_prepare(xs, ts, vec)
    _lanes_sums(xs, ts)
    _lanes_pick(ts, vec)
    for g in range(cnt):
        j0 = NSUB * g
        k = k0 + g
        row = out[k // nb]
        o = (k % nb) * BLOCK_BYTES
        xb = x[k // nb, (k % nb) * QK_K:(k % nb + 1) * QK_K]
        bad = False
        for s in range(NSUB):
            bad |= vec[_BAD * LANES + j0 + s] != F0
        if bad:  # inf or NaN somewhere: the plain transcription
            quantize_block_ref(xb, row, o, Lu)
            continue
        dall, zero = _finish_scales(row, o, vec[_SCALE * LANES + j0:_SCALE * LANES + j0 + NSUB])
        if zero:
            continue
        for s in range(NSUB):
            vec[_DL * LANES + j0 + s] = np.float32(dall * np.float32(np.int8(row[o + SCALES + s])))
        _block_codes(xb, Lu[:QK_K], vec, j0)
        _pack(row, o, Lu[:QK_K], Lu[QK_K:QK_K + SCALES])


@njit(parallel=True, cache=True, error_model="numpy")
def quantize(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q6_K_ref over rows: x float32 (rows, cols) → out uint8 (rows, cols/256*210).

    Parallel over workers, each taking a contiguous run of groups of GROUP super-blocks (counted row after row).
    """
    n_rows, n_cols = x.shape
    total = n_rows * (n_cols // QK_K)
    n_groups = (total + GROUP - 1) // GROUP
    n_work = min(n_groups, 1024)
    for w in prange(n_work):
        xs = np.empty(48 * LANES, dtype=np.float32)
        ts = np.empty(5 * NTRY * LANES, dtype=np.float32)
        vec = np.empty(NVEC * LANES, dtype=np.float32)
        Lu = np.empty(QK_K + SCALES, dtype=np.uint8)
        for c in range(w * n_groups // n_work, (w + 1) * n_groups // n_work):
            k0 = c * GROUP
            quantize_group(x, out, k0, min(GROUP, total - k0), xs, ts, vec, Lu)


@njit(cache=True, inline="always")
def dequantize_block(row, o: int, y, yo: int) -> None:
    """The block at row[o:] → y[yo:yo+256]: x = (d*sc)*(q - 32), as ggml and gguf-py."""
    d = load_fp16(row, o + D)
    for h in range(2):
        ql = o + QL + 64 * h
        qh = o + QH + 32 * h
        base = yo + 128 * h
        for k in range(4):
            for half in range(2):
                ds = np.float32(d * np.float32(np.int8(row[o + SCALES + 8 * h + 2 * k + half])))
                for l in range(16 * half, 16 * half + 16):
                    lo = (row[ql + l + 32 * (k & 1)] >> (4 * (k >> 1))) & 0xF
                    hi = (row[qh + l] >> (2 * k)) & 3
                    y[base + 32 * k + l] = np.float32(ds * np.float32(np.int32(lo | (hi << 4)) - 32))


@njit(parallel=True, cache=True)
def dequantize(q: np.ndarray, out: np.ndarray) -> None:
    """dequantize_row_q6_K over rows: q uint8 (rows, cols/256*210) → out float32 (rows, cols)."""
    for r in prange(out.shape[0]):
        for b in range(out.shape[1] // QK_K):
            dequantize_block(q[r], b * BLOCK_BYTES, out[r], b * QK_K)


# ---- with an importance matrix: quantize_row_q6_K_impl -------------------------------------------------------------
# As quantize_block_ref, with make_qx_quants weighted by the imatrix values themselves (llama.cpp keeps the
# sigma2 form for Q6_K commented out).

@njit(cache=True, error_model="numpy")
def quantize_block_weighted(xb, qwb, row, o: int, L, ts) -> None:
    """quantize_row_q6_K_impl on one super-block xb[:256] with importance qwb[:256] → row[o:o+210]."""
    scales = np.empty(NSUB, dtype=np.float32)
    for j in range(NSUB):
        scales[j] = make_qx_quants_w(xb, 16 * j, 16, NMAX, L, 16 * j, qwb, 16 * j, ts)
    dall, zero = _finish_scales(row, o, scales)
    if zero:
        return
    _requantize_pack(xb, row, o, L, dall)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_weighted(x: np.ndarray, out: np.ndarray, qw: np.ndarray) -> None:
    """quantize_row_q6_K_impl over rows (x float32 (rows, cols), qw float32 (cols,)), parallel over rows."""
    nb = x.shape[1] // QK_K
    for r in prange(x.shape[0]):
        L = np.empty(QK_K + SCALES, dtype=np.uint8)
        ts = np.empty(QX_SCRATCH, dtype=np.float32)
        for b in range(nb):
            quantize_block_weighted(x[r, b * QK_K:(b + 1) * QK_K], qw[b * QK_K:(b + 1) * QK_K], out[r],
                                    b * BLOCK_BYTES, L, ts)
