"""Q3_K: super-blocks of 256 weights in 16 sub-blocks of 16, x = (d*(sc - 32))*(q - 4) (ggml's block_q3_K).

Layout (110 bytes, little-endian): hmask[32] @0, qs[64] @32, scales[12] @96, d:fp16 @108. Weight
e = 128h + 32k + l (h = 0, 1; k = 0..3; l < 32) has the 3-bit code q = low | high << 2 with
low = (qs[32h + l] >> 2k) & 3 and high = (hmask[l] >> (4h + k)) & 1. The 16 6-bit scales sc (stored + 32):
low nibbles of scales 0-7 in bytes 0-7, of scales 8-15 in the high nibbles of bytes 0-7; bits 4-5 of scale j in
byte 8 + j%4 at bit 2*(j/4).

Quantization is quantize_row_q3_K_ref (what ggml_quantize_chunk runs without an importance matrix): each
sub-block's scale comes from make_q3_quants(nmax 4, rmse with weights x*x: a first rounding then up to 5 passes
moving single codes while that improves the weighted fit), the 16 scales are quantized to 6 bits against a fp16
super-scale, then every weight is requantized with its final scale.

Bit-exactness: float32 arithmetic in C's order (see kquant_common), ggml's nearest_int including its behaviour
outside ±4194303, C's int8_t/uint8_t truncations.

Speed: make_q3_quants runs on the 128 sub-blocks of GROUP super-blocks at once, one per lane, every loop over the
lanes vectorised by LLVM. A lane whose pass changed nothing stays unchanged through further passes (its state is
what that pass saw throughout), so all lanes run until none changes, at most 5 passes, as C. Rare cases leave the
fast path: a super-block holding inf or NaN is done by the plain transcription `quantize_block_ref`, a sub-block
whose refinement needs nearest_int beyond its exact range by `make_q3_quants`, a requantization beyond it by
ggml_nearest_int. `quantize_block_ref` is the transcription alone (the tests run it block by block).

What LLVM needs to vectorise these loops (checked in the assembly): run-time trip counts over the lanes (16
known iterations get unrolled instead), flat scratch arrays indexed with compile-time strides (no run-time alias
checks), loops over lanes outermost only when the inner loop over weights has no stores, and no in-place
conditional updates (they become masked stores, very slow on AMD).
"""
import numpy as np
from numba import njit, prange

from qtool.formats.constants import GGMLType

from .common import load_fp16, store_fp16
from .kquant_common import (MAGIC, NEAREST_INT_SAFE, QK_K, ggml_nearest_int,
                            gather_subblocks16, lane_weights16, largest_magnitude)
from .traits import block, fields
from .weighted import QX_SCRATCH, make_qx_quants_w, twice_mean_square, weights_and_sum

BLOCK_BYTES = block(GGMLType.Q3_K)[1]
HMASK, QS, SCALES, D = fields(GGMLType.Q3_K, "hmask", "qs", "scales", "d")
NMAX = 4
NSUB = QK_K // 16
GROUP_MAX_EPS = np.float32(1e-15)
F0 = np.float32(0.0)
F1 = np.float32(1.0)


@njit(cache=True, inline="always", error_model="numpy")
def _clamp(l: int, lo: int, hi: int) -> int:
    return lo if l < lo else (hi if l > hi else l)


@njit(cache=True, error_model="numpy")
def make_q3_quants(x, nmax: int, L) -> np.float32:
    """ggml's make_q3_quants(n, nmax, x, L, do_rmse=true), plainly transcribed.

    Codes nmax + l (l in [-nmax, nmax-1]) go to L[:n] (0 for an all-zero group); returns the scale.
    """
    n = x.shape[0]
    amax, mx = largest_magnitude(x, n)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    iscale = np.float32(-np.float32(nmax) / mx)
    Li = np.empty(n, dtype=np.int64)
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = _clamp(ggml_nearest_int(np.float32(iscale * x[i])), -nmax, nmax - 1)
        Li[i] = l
        w = np.float32(x[i] * x[i])
        fl = np.float32(l)
        sumlx = np.float32(sumlx + np.float32(np.float32(w * x[i]) * fl))
        suml2 = np.float32(suml2 + np.float32(np.float32(w * fl) * fl))
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = np.float32(x[i] * x[i])
            fl = np.float32(Li[i])
            slx = np.float32(sumlx - np.float32(np.float32(w * x[i]) * fl))
            if slx > F0:
                sl2 = np.float32(suml2 - np.float32(np.float32(w * fl) * fl))
                new_l = _clamp(ggml_nearest_int(np.float32(np.float32(x[i] * sl2) / slx)), -nmax, nmax - 1)
                if new_l != Li[i]:
                    fn = np.float32(new_l)
                    slx = np.float32(slx + np.float32(np.float32(w * x[i]) * fn))
                    sl2 = np.float32(sl2 + np.float32(np.float32(w * fn) * fn))
                    if sl2 > F0 and np.float32(np.float32(slx * slx) * suml2) > \
                            np.float32(np.float32(sumlx * sumlx) * sl2):
                        Li[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] = Li[i] + nmax
    return np.float32(sumlx / suml2) if suml2 > F0 else F0


@njit(cache=True, error_model="numpy")
def _finish_scales(row, o: int, scales):
    """6-bit sub-block scales and the fp16 super-scale into the block at row[o:]; returns d as float32."""
    amax, max_scale = largest_magnitude(scales, NSUB)
    sp = o + SCALES
    for k in range(12):
        row[sp + k] = 0
    if max_scale != F0:  # C: if (max_scale), NaN included
        iscale = np.float32(np.float32(-32.0) / max_scale)
        for j in range(NSUB):
            l = ((ggml_nearest_int(np.float32(iscale * scales[j])) + 128) & 0xFF) - 128  # int8_t l = ...
            l = _clamp(l, -32, 31) + 32
            if j < 8:
                row[sp + j] = l & 0xF
            else:
                row[sp + j - 8] |= (l & 0xF) << 4
            row[sp + 8 + j % 4] |= (l >> 4) << (2 * (j // 4))
        return store_fp16(row, o + D, np.float32(F1 / iscale))
    return store_fp16(row, o + D, F0)


@njit(cache=True, inline="always", error_model="numpy")
def _scale(row, o: int, j: int) -> int:
    """6-bit scale j of the block at row[o:], minus 32."""
    sp = o + SCALES
    lo = (np.int64(row[sp + j]) & 0xF) if j < 8 else (np.int64(row[sp + j - 8]) >> 4)
    return (lo | ((np.int64(row[sp + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4) - 32


@njit(cache=True, inline="always", error_model="numpy")
def _requantize_pack(xb, row, o: int, L, dall) -> None:
    """The end of quantize_row_q3_K_ref and _impl: each weight of xb[:256] requantized against its sub-block's
    6-bit scale (a sub-block whose scale is 0 keeps the search's codes, as C does), then packed into row[o:].
    L: uint8 (352,) scratch holding the codes."""
    for j in range(NSUB):
        d = np.float32(dall * np.float32(_scale(row, o, j)))
        if d == F0:
            continue
        for i in range(16):
            L[16 * j + i] = _clamp(ggml_nearest_int(np.float32(xb[16 * j + i] / d)), -4, 3) + 4
    _pack(row, o, L[:QK_K], L[QK_K:QK_K + SCALES])


@njit(cache=True, error_model="numpy")
def quantize_block_ref(xb, row, o: int, L) -> None:
    """quantize_row_q3_K_ref on one super-block xb[:256] → row[o:o+110], plainly transcribed (L: uint8 (352,)
    scratch)."""
    scales = np.empty(NSUB, dtype=np.float32)
    for j in range(NSUB):
        scales[j] = make_q3_quants(xb[16 * j:16 * j + 16], NMAX, L[16 * j:16 * j + 16])
    dall = _finish_scales(row, o, scales)
    _requantize_pack(xb, row, o, L, dall)


# ---- fast path: the sub-blocks of GROUP super-blocks as lanes -------------------------------------------------
# Lane j = 16*g + s is sub-block s of super-block g of the group. Scratch per worker, flat float32 arrays indexed
# with the compile-time LANES (so LLVM sees constant offsets from one base and needs no run-time alias checks):
#   xs[(3*i + k)*LANES + j]: weight i of lane j (k=0), w = x*x (k=1), w*x (k=2); ls[i*LANES + j]: its code l
#   in -4..3;
#   vec[k*LANES + j]: per-lane values, k below.

GROUP = 8  # super-blocks per group
LANES = NSUB * GROUP
_ISC, _ALIVE, _BAD, _SLX, _SL2, _REDO, _SCALE, _DL = range(8)
NVEC = 8
NXS = 3 * 16


@njit(cache=True, error_model="numpy")
def _lanes_prepare(xs, vec) -> None:
    """w = x*x and w*x, each lane's max |x| (the first one wins, as C), inf/NaN flags and iscale = -4/max."""
    nl = vec.shape[0] // NVEC  # LANES, as a run-time trip count
    for j in range(nl):
        amax, mx, bad = lane_weights16(xs, j, LANES)
        a = (amax >= GROUP_MAX_EPS) & (bad == F0)
        vec[_ALIVE * LANES + j] = F1 if a else F0
        vec[_BAD * LANES + j] = bad
        vec[_ISC * LANES + j] = np.float32(-np.float32(NMAX) / (mx if a else F1))
        vec[_REDO * LANES + j] = F0


@njit(cache=True, error_model="numpy")
def _lanes_first(xs, ls, vec) -> None:
    """The first codes l = clamp(nearest_int(iscale*x), -4, 3) (|iscale*x| <= 4 here), sums of w*x*l, w*l*l."""
    nl = vec.shape[0] // NVEC
    lo = np.float32(-NMAX)
    hi = np.float32(NMAX - 1)
    for i in range(16):  # (codes and sums in one loop nest would not be vectorised)
        for j in range(nl):
            r = np.float32(np.float32(np.float32(vec[_ISC * LANES + j] * xs[3 * i * LANES + j]) + MAGIC) - MAGIC)
            r = r if r > lo else lo
            r = r if r < hi else hi
            ls[i * LANES + j] = r
    for j in range(nl):
        s1 = F0
        s2 = F0
        for i in range(16):
            r = ls[i * LANES + j]
            s1 = np.float32(s1 + np.float32(xs[(3 * i + 2) * LANES + j] * r))
            s2 = np.float32(s2 + np.float32(np.float32(xs[(3 * i + 1) * LANES + j] * r) * r))
        vec[_SLX * LANES + j] = s1
        vec[_SL2 * LANES + j] = s2


@njit(cache=True, error_model="numpy")
def _refine_pass(xs, ls, vec) -> bool:
    """One refinement pass on every lane at once (codes in ls, sums in vec rows _SLX, _SL2): for each weight
    i in turn, vectorised over the lanes. Returns whether some lane changed. A lane whose new code needs
    nearest_int beyond ±4194303 (or of NaN) is left unchanged and marked in vec[_REDO]: make_q3_quants redoes
    that sub-block afterwards.

    An unchanged lane stores back `old + 0.0` rather than `old`: storing back the value just loaded would let
    LLVM turn the update into a masked store, which is slow on AMD. Adding +0.0 only turns -0.0 into +0.0, and
    codes and sums are never -0.0 here (they start as +0.0 and sums of +0.0 and -0.0 are +0.0)."""
    nl = vec.shape[0] // NVEC
    lo = np.float32(-NMAX)
    hi = np.float32(NMAX - 1)
    anychg = False
    for i in range(16):
        for j in range(nl):
            x = xs[3 * i * LANES + j]
            w = xs[(3 * i + 1) * LANES + j]
            wx = xs[(3 * i + 2) * LANES + j]
            fl = ls[i * LANES + j]
            s1 = vec[_SLX * LANES + j]
            s2 = vec[_SL2 * LANES + j]
            slx = np.float32(s1 - np.float32(wx * fl))
            sl2 = np.float32(s2 - np.float32(np.float32(w * fl) * fl))
            v = np.float32(np.float32(x * sl2) / slx)
            go = (slx > F0) & (vec[_ALIVE * LANES + j] != F0)
            b = go & (not (abs(v) <= NEAREST_INT_SAFE))  # includes NaN
            rd = np.float32(vec[_REDO * LANES + j] + F0)
            vec[_REDO * LANES + j] = F1 if b else rd
            r = np.float32(np.float32(v + MAGIC) - MAGIC)
            r = r if r > lo else lo
            r = r if r < hi else hi
            nslx = np.float32(slx + np.float32(wx * r))
            nsl2 = np.float32(sl2 + np.float32(np.float32(w * r) * r))
            up = (go & (not b) & (r != fl) & (nsl2 > F0)
                  & (np.float32(np.float32(nslx * nslx) * s2) > np.float32(np.float32(s1 * s1) * nsl2)))
            anychg |= up
            ls[i * LANES + j] = r if up else np.float32(fl + F0)
            vec[_SLX * LANES + j] = nslx if up else np.float32(s1 + F0)
            vec[_SL2 * LANES + j] = nsl2 if up else np.float32(s2 + F0)
    return anychg


@njit(cache=True, error_model="numpy")
def _lanes_refine(xs, ls, vec) -> None:
    """make_q3_quants' up to 5 passes over every lane at once. A lane whose pass changed nothing is left as is by
    further passes (its state is what the pass saw throughout), so running until no lane changed is C's loop."""
    for _ in range(5):
        if not _refine_pass(xs, ls, vec):
            break


@njit(cache=True, error_model="numpy")
def _block_codes(xb, L, ls, vec, j0: int) -> None:
    """Final codes 0..7 of one super-block (lanes j0 .. j0+15) into L[:256], in natural order:
    clamp(nearest_int(x/dl), -4, 3) + 4 where dl = d*(sc-32) != 0, else make_q3_quants' own codes + 4 (from
    ls; 0 for all-zero sub-blocks)."""
    n = L.shape[0] // NSUB  # 16, as a run-time trip count: the loop over it is vectorised
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
            if not ok:  # |x/dl| beyond nearest_int's exact range, or NaN
                for i in range(n):
                    L[16 * s + i] = _clamp(ggml_nearest_int(np.float32(xb[16 * s + i] / d)), -4, 3) + 4
            # (written out here and in q6_k: as one inline helper in kquant_common this loop made Q3_K's quantize
            # 1.15x slower, measured on 2048x4096, 2 threads)
        elif vec[_ALIVE * LANES + j0 + s] != F0:
            for i in range(16):
                L[16 * s + i] = np.uint8(np.int32(ls[i * LANES + j0 + s]) + NMAX)
        else:
            for i in range(16):
                L[16 * s + i] = 0


@njit(cache=True, error_model="numpy")
def _pack(row, o: int, L, tmp) -> None:
    """Codes L[:256] (0..7) → hmask (bit 2) and qs (bits 0-1), row[o:o+96]. tmp: uint8 (96,) scratch; packing
    there first and copying lets LLVM vectorise (it cannot tell that row and L do not overlap)."""
    n = L.shape[0] // 8  # 32, run-time
    for l in range(n):
        m = np.int32(0)
        for k in range(8):
            m |= (np.int32(L[32 * k + l]) >> 2) << k
        tmp[HMASK + l] = m
    for h in range(2):
        b = 128 * h
        for l in range(n):
            tmp[QS + 32 * h + l] = ((np.int32(L[b + l]) & 3) | ((np.int32(L[b + l + 32]) & 3) << 2)
                                    | ((np.int32(L[b + l + 64]) & 3) << 4) | ((np.int32(L[b + l + 96]) & 3) << 6))
    for k in range(tmp.shape[0]):
        row[o + k] = tmp[k]


@njit(cache=True, error_model="numpy")
def quantize_group(x, out, k0: int, cnt: int, xs, ls, vec, Lu) -> None:
    """quantize_row_q3_K_ref on super-blocks k0 .. k0+cnt-1 (cnt <= GROUP) of x (counted row after row) → out.
    Scratch: xs float32 (NXS*LANES,), ls float32 (16*LANES,), vec float32 (NVEC*LANES,), Lu uint8 (352,).
    Super-blocks holding inf or NaN go through quantize_block_ref."""
    nb = x.shape[1] // QK_K
    gather_subblocks16(x, k0, cnt, xs, GROUP, LANES)
    _lanes_prepare(xs, vec)
    _lanes_first(xs, ls, vec)
    _lanes_refine(xs, ls, vec)
    L = Lu[:QK_K]
    for j in range(LANES):  # make_q3_quants' return value
        s2 = vec[_SL2 * LANES + j]
        sc = np.float32(vec[_SLX * LANES + j] / s2)
        vec[_SCALE * LANES + j] = sc if (s2 > F0) & (vec[_ALIVE * LANES + j] != F0) else F0
    for j in range(LANES):
        if vec[_REDO * LANES + j] != F0:  # rare: the plain make_q3_quants for this sub-block
            g = j // NSUB
            s = j % NSUB
            k = k0 + g
            xb = x[k // nb, (k % nb) * QK_K + 16 * s:(k % nb) * QK_K + 16 * s + 16]
            vec[_SCALE * LANES + j] = make_q3_quants(xb, NMAX, L)
            for i in range(16):
                ls[i * LANES + j] = np.float32(np.int32(L[i]) - NMAX)
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
        dall = _finish_scales(row, o, vec[_SCALE * LANES + j0:_SCALE * LANES + j0 + NSUB])
        for s in range(NSUB):
            vec[_DL * LANES + j0 + s] = np.float32(dall * np.float32(_scale(row, o, s)))
        _block_codes(xb, L, ls, vec, j0)
        _pack(row, o, L, Lu[QK_K:QK_K + SCALES])


@njit(parallel=True, cache=True, error_model="numpy")
def quantize(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q3_K_ref over rows: x float32 (rows, cols) → out uint8 (rows, cols/256*110).

    Parallel over workers, each taking a contiguous run of groups of GROUP super-blocks (counted row after row).
    """
    n_rows, n_cols = x.shape
    total = n_rows * (n_cols // QK_K)
    n_groups = (total + GROUP - 1) // GROUP
    n_work = min(n_groups, 1024)
    for w in prange(n_work):
        xs = np.empty(NXS * LANES, dtype=np.float32)
        ls = np.empty(16 * LANES, dtype=np.float32)
        vec = np.empty(NVEC * LANES, dtype=np.float32)
        Lu = np.empty(QK_K + SCALES, dtype=np.uint8)
        for c in range(w * n_groups // n_work, (w + 1) * n_groups // n_work):
            k0 = c * GROUP
            quantize_group(x, out, k0, min(GROUP, total - k0), xs, ls, vec, Lu)


@njit(cache=True, inline="always")
def dequantize_block(row, o: int, y, yo: int) -> None:
    """The block at row[o:] → y[yo:yo+256]: x = (d*(sc - 32))*(q - 4), as ggml and gguf-py."""
    d = load_fp16(row, o + D)
    for h in range(2):
        for k in range(4):
            for half in range(2):
                dl = np.float32(d * np.float32(_scale(row, o, 8 * h + 2 * k + half)))
                for l in range(16 * half, 16 * half + 16):
                    low = (np.int64(row[o + QS + 32 * h + l]) >> (2 * k)) & 3
                    high = (np.int64(row[o + HMASK + l]) >> (4 * h + k)) & 1
                    y[yo + 128 * h + 32 * k + l] = np.float32(dl * np.float32(np.int32(low) - (0 if high else 4)))


@njit(parallel=True, cache=True)
def dequantize(q: np.ndarray, out: np.ndarray) -> None:
    """dequantize_row_q3_K over rows: q uint8 (rows, cols/256*110) → out float32 (rows, cols)."""
    for r in prange(out.shape[0]):
        for b in range(out.shape[1] // QK_K):
            dequantize_block(q[r], b * BLOCK_BYTES, out[r], b * QK_K)


# ---- with an importance matrix: quantize_row_q3_K_impl -------------------------------------------------------------
# Per super-block sigma2 = 2*mean x^2; sub-block j's weights qw*sqrtf(sigma2 + x^2) drive make_qx_quants (nmax 4);
# the 16 scales are quantized to 6 bits by make_qx_quants (nmax 32) weighted by the sub-blocks' sums of weights,
# against the fp16 super-scale it returns; then every weight is requantized.

@njit(cache=True, error_model="numpy")
def quantize_block_weighted(xb, qwb, row, o: int, L, weight, sw, scales, ls, ts) -> None:
    """quantize_row_q3_K_impl on one super-block xb[:256] with importance qwb[:256] → row[o:o+110] (L: uint8
    (352,) scratch)."""
    sigma2 = twice_mean_square(xb, 0, QK_K)
    for j in range(NSUB):
        sw[j] = weights_and_sum(xb, 16 * j, 16, sigma2, qwb, 16 * j, weight)
        scales[j] = make_qx_quants_w(xb, 16 * j, 16, NMAX, L, 16 * j, weight, 0, ts)
    sp = o + SCALES
    for k in range(12):
        row[sp + k] = 0
    d_block = make_qx_quants_w(scales, 0, NSUB, 32, ls, 0, sw, 0, ts)
    for j in range(NSUB):
        l = np.int32(ls[j])
        if j < 8:
            row[sp + j] = l & 0xF
        else:
            row[sp + j - 8] |= (l & 0xF) << 4
        row[sp + 8 + j % 4] |= ((l >> 4) << (2 * (j // 4))) & 0xFF
    dall = store_fp16(row, o + D, d_block)
    _requantize_pack(xb, row, o, L, dall)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_weighted(x: np.ndarray, out: np.ndarray, qw: np.ndarray) -> None:
    """quantize_row_q3_K_impl over rows (x float32 (rows, cols), qw float32 (cols,)), parallel over rows."""
    nb = x.shape[1] // QK_K
    for r in prange(x.shape[0]):
        L = np.empty(QK_K + SCALES, dtype=np.uint8)
        weight = np.empty(16, dtype=np.float32)
        sw = np.empty(NSUB, dtype=np.float32)
        scales = np.empty(NSUB, dtype=np.float32)
        ls = np.empty(NSUB, dtype=np.uint8)
        ts = np.empty(QX_SCRATCH, dtype=np.float32)
        for b in range(nb):
            quantize_block_weighted(x[r, b * QK_K:(b + 1) * QK_K], qw[b * QK_K:(b + 1) * QK_K], out[r],
                                    b * BLOCK_BYTES, L, weight, sw, scales, ls, ts)
