"""Pieces shared by the K-quants (super-blocks of QK_K = 256 weights): ggml's nearest_int, make_qkx2_quants and
the chunked scale search of the "x = d*sc*q - dmin*m" types (Q2_K here in q2_k.py, Q4_K/Q5_K in kquant_k4.py).

Bit-exactness notes (checked against llama.cpp's ggml_quantize_chunk, which without an importance matrix calls
quantize_row_q{2,4,5}_K_ref):
  * every C `float` expression is evaluated in float32, one rounding per operation, left to right, no fused
    multiply-add (ggml-quants.c lives in ggml-base, built for baseline x86-64: no vfmadd in libggml-base.so);
    numba does the same as long as nothing is promoted to float64, hence np.float32 constants everywhere and
    ints converted with np.float32() before they meet a float;
  * sums are accumulated in C's order (LLVM never reassociates float adds without fastmath);
  * ggml's nearest_int(f) is the 1.5*2^23 trick: round half to even for |f| <= 4194303 and, beyond that (asserts
    are compiled out), the low 23 bits of the float32 f + 12582912 minus 0x400000 — `ggml_nearest_int`
    reproduces both, so blocks of subnormals (whose 1/range overflows to inf) come out as llama.cpp writes them;
  * C stores ints into uint8_t fields by keeping the low byte; we mask with 0xFF wherever C does that.

make_qkx2_quants is the hot spot: nstep+1 weighted least-squares refits of every sub-block, each refit depending
on the previous ones (a winning refit moves the sub-block's min, which the next refits use). So the refits stay
sequential, and instead `make_qkx2_quants_lanes` searches many sub-blocks at once (all those of CHUNK_BLOCKS
super-blocks, 64-128), one per lane: the loops run over lanes innermost, which LLVM vectorises while every lane
keeps C's own order of operations. A lane that could push nearest_int outside its exact range (ranges so small
that nmax/range overflows, inf, NaN) is redone with `make_qkx2_quants_ref`, a plain transcription of ggml's.

numba's on-disk cache keys each cached function on its own file only; kernels/__init__.py drops the cache when
this module (one of its _SHARED_SOURCES) changes.
"""
import math

import numpy as np
from numba import njit

from qtool.formats.constants import QK_K


MAGIC = np.float32(12582912.0)  # 1.5 * 2**23
NEAREST_INT_SAFE = np.float32(4194303.0)  # |f| up to here: the trick is plain round-half-to-even
F0 = np.float32(0.0)
F1 = np.float32(1.0)


@njit(cache=True, error_model="numpy")
def _nearest_int_wide(v: np.float32) -> int:
    """nearest_int() outside its exact range: low 23 bits of float32(v + 1.5*2^23), minus 0x400000."""
    val = np.float32(v + MAGIC)
    if val != val:
        return 0  # x86's default NaN (0xFFC00000) has mantissa 0x400000
    a = abs(float(val))
    if a == math.inf:
        return -0x400000
    if a == 0.0:
        mant = 0
    else:
        m, e = math.frexp(a)  # a = m * 2**e, 0.5 <= m < 1
        if e - 1 >= -126:
            mant = int(m * 16777216.0) - 8388608  # normal: drop the implicit bit
        else:
            mant = int(math.ldexp(a, 149))  # subnormal: units of 2**-149
    return mant - 0x400000


@njit(cache=True, inline="always", error_model="numpy")
def ggml_nearest_int(v: np.float32) -> int:
    """ggml-quants.c's nearest_int() on a float32, bit for bit (including its behaviour past ±4194303)."""
    if abs(v) <= NEAREST_INT_SAFE:
        return int(np.float32(np.float32(v + MAGIC) - MAGIC))
    return _nearest_int_wide(v)


@njit(cache=True, inline="always", error_model="numpy")
def clamp_nearest(v: np.float32, nmax: int) -> int:
    """MAX(0, MIN(nmax, nearest_int(v)))."""
    l = ggml_nearest_int(v)
    if l > nmax:
        l = nmax
    if l < 0:
        l = 0
    return l


@njit(cache=True, inline="always", error_model="numpy")
def refit_scale_min(sum_w, sum_x, sum_l, sum_l2, sum_xl, D):
    """make_qkx2_quants' (and make_qkx3_quants') weighted least-squares refit of one trial's codes, D > 0 being
    its determinant: (this_scale, this_min), the min capped at 0 with the scale refitted alone, as in C."""
    this_scale = np.float32(np.float32(np.float32(sum_w * sum_xl) - np.float32(sum_x * sum_l)) / D)
    this_min = np.float32(np.float32(np.float32(sum_l2 * sum_x) - np.float32(sum_l * sum_xl)) / D)
    if this_min > F0:
        this_min = F0
        this_scale = np.float32(sum_xl / sum_l2)
    return this_scale, this_min


@njit(cache=True, error_model="numpy")
def make_qkx2_quants_ref(x, n, nmax, w, L, rmin, rdelta, nstep, use_mad):
    """Plain transcription of ggml's make_qkx2_quants on x[:n] with weights w[:n].

    Writes the codes to L[:n] (uint8) and returns (scale, the_min) with x ≈ scale*L - the_min.
    """
    fnmax = np.float32(nmax)
    mn = x[0]
    mx = x[0]
    sum_w = w[0]
    sum_x = np.float32(sum_w * x[0])
    for i in range(1, n):
        xi = x[i]
        if xi < mn:
            mn = xi
        if xi > mx:
            mx = xi
        wi = w[i]
        sum_w = np.float32(sum_w + wi)
        sum_x = np.float32(sum_x + np.float32(wi * xi))
    if mn > F0:
        mn = F0
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return F0, np.float32(-mn)
    rng = np.float32(mx - mn)
    iscale = np.float32(fnmax / rng)
    scale = np.float32(F1 / iscale)
    best_error = F0
    for i in range(n):
        l = clamp_nearest(np.float32(iscale * np.float32(x[i] - mn)), nmax)
        L[i] = l
        diff = np.float32(np.float32(np.float32(scale * np.float32(l)) + mn) - x[i])
        diff = abs(diff) if use_mad else np.float32(diff * diff)
        best_error = np.float32(best_error + np.float32(w[i] * diff))
    if nstep < 1:
        return scale, np.float32(-mn)
    laux = np.empty(n, dtype=np.uint8)
    for s in range(nstep + 1):
        iscale = np.float32(np.float32(np.float32(rmin + np.float32(rdelta * np.float32(s))) + fnmax)
                            / np.float32(mx - mn))  # mn moves when a refit wins
        sum_l = F0
        sum_l2 = F0
        sum_xl = F0
        for i in range(n):
            l = clamp_nearest(np.float32(iscale * np.float32(x[i] - mn)), nmax)
            laux[i] = l
            fl = np.float32(l)
            wl = np.float32(w[i] * fl)
            sum_l = np.float32(sum_l + wl)
            sum_l2 = np.float32(sum_l2 + np.float32(wl * fl))
            sum_xl = np.float32(sum_xl + np.float32(wl * x[i]))
        D = np.float32(np.float32(sum_w * sum_l2) - np.float32(sum_l * sum_l))
        if D > F0:
            this_scale, this_min = refit_scale_min(sum_w, sum_x, sum_l, sum_l2, sum_xl, D)
            cur_error = F0
            for i in range(n):
                diff = np.float32(np.float32(np.float32(this_scale * np.float32(laux[i])) + this_min) - x[i])
                diff = abs(diff) if use_mad else np.float32(diff * diff)
                cur_error = np.float32(cur_error + np.float32(w[i] * diff))
            if cur_error < best_error:
                for i in range(n):
                    L[i] = laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, np.float32(-mn)


# rows of make_qkx2_quants_lanes' per-lane float32 state array `st` (shape (QKX2_STATE, lanes))
(_MN, _MX, _XLO, _SW, _SX, _BEST, _SCALE, _ISC, _SL, _SL2, _SXL, _ERR, _TS, _TM, _UPD, _ACT, _BAD, _WISC, _WMN,
 _AUX) = range(20)
QKX2_STATE = 20
CHUNK_BLOCKS = 8  # super-blocks searched together (64-128 lanes: enough for LLVM's loop vectoriser)

# make_qkx2_quants_lanes is split into small functions, one loop nest each over (weights ×) lanes: LLVM's loop
# vectoriser handles them reliably in isolation (it left some scalar inside one big function). Lane j's state
# lives in column j of st; the codes are never copied around: a lane remembers the (iscale, min) its best codes
# came from (_WISC, _WMN) and the codes are recomputed from them once at the end, with the same float ops.


@njit(cache=True, error_model="numpy")
def _lanes_init(xt, wt, st, fnmax) -> None:
    """min, max, sum w, sum w*x of each lane; the first iscale/scale (nmax/(max-min)) and its error."""
    n, nl = xt.shape
    for j in range(nl):
        v = xt[0, j]
        st[_MN, j] = v
        st[_MX, j] = v
        st[_SW, j] = wt[0, j]
        st[_SX, j] = np.float32(wt[0, j] * v)
    for i in range(1, n):
        for j in range(nl):
            v = xt[i, j]
            w = wt[i, j]
            st[_MN, j] = v if v < st[_MN, j] else st[_MN, j]
            st[_MX, j] = v if v > st[_MX, j] else st[_MX, j]
            st[_SW, j] = np.float32(st[_SW, j] + w)
            st[_SX, j] = np.float32(st[_SX, j] + np.float32(w * v))
    for j in range(nl):
        st[_XLO, j] = st[_MN, j]
        m = F0 if st[_MN, j] > F0 else st[_MN, j]
        st[_MN, j] = m
        a = st[_MX, j] != m
        st[_ACT, j] = F1 if a else F0
        rng = np.float32(st[_MX, j] - m) if a else F1  # constant sub-blocks: dummy lane, result set at the end
        v = np.float32(fnmax / rng)
        st[_ISC, j] = v
        st[_WISC, j] = v
        st[_WMN, j] = m
        st[_SCALE, j] = np.float32(F1 / v)
        st[_BEST, j] = F0
        # fl(v*(x - m)) is monotonic in x, so its extremes come from the sub-block's min and max
        hi = np.float32(v * np.float32(st[_MX, j] - m))
        lo = np.float32(v * np.float32(st[_XLO, j] - m))
        st[_BAD, j] = F0 if (hi <= NEAREST_INT_SAFE and lo >= -NEAREST_INT_SAFE) else F1


@njit(cache=True, error_model="numpy")
def _lanes_first_error(xt, wt, st, fnmax, use_mad) -> None:
    """st[_BEST] = error of the first codes, sum of w*|scale*l + min - x| (use_mad) or w*(...)^2."""
    n, nl = xt.shape
    for i in range(n):
        for j in range(nl):
            v = xt[i, j]
            r = np.float32(np.float32(np.float32(st[_ISC, j] * np.float32(v - st[_MN, j])) + MAGIC) - MAGIC)
            r = r if r < fnmax else fnmax
            r = r if r > F0 else F0
            d = np.float32(np.float32(np.float32(st[_SCALE, j] * r) + st[_MN, j]) - v)
            d = abs(d) if use_mad else np.float32(d * d)
            st[_BEST, j] = np.float32(st[_BEST, j] + np.float32(wt[i, j] * d))


@njit(cache=True, error_model="numpy")
def _lanes_iscale(st, num) -> None:
    """iscale = (rmin + rdelta*step + nmax)/(max - min) with each lane's current min; flag unsafe lanes."""
    nl = st.shape[1]
    for j in range(nl):
        rng = np.float32(st[_MX, j] - st[_MN, j]) if st[_ACT, j] != F0 else F1
        v = np.float32(num / rng)
        st[_ISC, j] = v
        hi = np.float32(v * np.float32(st[_MX, j] - st[_MN, j]))
        lo = np.float32(v * np.float32(st[_XLO, j] - st[_MN, j]))
        st[_BAD, j] = st[_BAD, j] if (hi <= NEAREST_INT_SAFE and lo >= -NEAREST_INT_SAFE) else F1


@njit(cache=True, error_model="numpy")
def _refit_sums(xt, wt, laux, st, fnmax) -> None:
    """Codes l of every weight for the lanes' iscale into laux; sums of w*l, w*l*l, w*l*x in C's order."""
    n, nl = xt.shape
    for j in range(nl):
        st[_SL, j] = F0
        st[_SL2, j] = F0
        st[_SXL, j] = F0
    for i in range(n):
        for j in range(nl):
            v = xt[i, j]
            r = np.float32(np.float32(np.float32(st[_ISC, j] * np.float32(v - st[_MN, j])) + MAGIC) - MAGIC)
            r = r if r < fnmax else fnmax
            r = r if r > F0 else F0
            laux[i, j] = r
            wl = np.float32(wt[i, j] * r)
            st[_SL, j] = np.float32(st[_SL, j] + wl)
            st[_SL2, j] = np.float32(st[_SL2, j] + np.float32(wl * r))
            st[_SXL, j] = np.float32(st[_SXL, j] + np.float32(wl * v))


@njit(cache=True, error_model="numpy")
def _refit_solve(st) -> None:
    """Weighted least-squares scale ts and min tm (clamped to <= 0) of each lane; _UPD = D > 0 (fit valid)."""
    nl = st.shape[1]
    for j in range(nl):
        a = st[_SL, j]
        b = st[_SL2, j]
        c = st[_SXL, j]
        D = np.float32(np.float32(st[_SW, j] * b) - np.float32(a * a))
        t_s = np.float32(np.float32(np.float32(st[_SW, j] * c) - np.float32(st[_SX, j] * a)) / D)
        t_m = np.float32(np.float32(np.float32(b * st[_SX, j]) - np.float32(a * c)) / D)
        pos = t_m > F0
        st[_TS, j] = np.float32(c / b) if pos else t_s
        st[_TM, j] = F0 if pos else t_m
        st[_UPD, j] = F1 if (D > F0 and st[_ACT, j] != F0) else F0


@njit(cache=True, error_model="numpy")
def _refit_errors_sq(xt, wt, laux, st) -> None:
    """st[_ERR] = sum of w * (ts*l + tm - x)^2 over each lane, in C's order."""
    n, nl = xt.shape
    for j in range(nl):
        st[_ERR, j] = F0
    for i in range(n):
        for j in range(nl):
            d = np.float32(np.float32(np.float32(st[_TS, j] * laux[i, j]) + st[_TM, j]) - xt[i, j])
            st[_ERR, j] = np.float32(st[_ERR, j] + np.float32(wt[i, j] * np.float32(d * d)))


@njit(cache=True, error_model="numpy")
def _refit_errors_mad(xt, wt, laux, st) -> None:
    """st[_ERR] = sum of w * |ts*l + tm - x| over each lane, in C's order."""
    n, nl = xt.shape
    for j in range(nl):
        st[_ERR, j] = F0
    for i in range(n):
        for j in range(nl):
            d = np.float32(np.float32(np.float32(st[_TS, j] * laux[i, j]) + st[_TM, j]) - xt[i, j])
            st[_ERR, j] = np.float32(st[_ERR, j] + np.float32(wt[i, j] * abs(d)))


@njit(cache=True, error_model="numpy")
def _refit_pick(st) -> None:
    """C's `if (cur_error < best_error)`: the lanes whose valid refit is strictly better adopt it."""
    nl = st.shape[1]
    for j in range(nl):
        u = st[_UPD, j] != F0 and st[_ERR, j] < st[_BEST, j]
        st[_BEST, j] = st[_ERR, j] if u else st[_BEST, j]
        st[_SCALE, j] = st[_TS, j] if u else st[_SCALE, j]
        st[_WISC, j] = st[_ISC, j] if u else st[_WISC, j]
        st[_WMN, j] = st[_MN, j] if u else st[_WMN, j]
        st[_MN, j] = st[_TM, j] if u else st[_MN, j]


@njit(cache=True, error_model="numpy")
def _lanes_codes(xt, lt, st, fnmax) -> None:
    """The winning codes of each lane, recomputed from the (iscale, min) they came from; 0 for constant lanes."""
    n, nl = xt.shape
    for j in range(nl):
        st[_SCALE, j] = st[_SCALE, j] if st[_ACT, j] != F0 else F0
    for i in range(n):
        for j in range(nl):
            v = xt[i, j]
            r = np.float32(np.float32(np.float32(st[_WISC, j] * np.float32(v - st[_WMN, j])) + MAGIC) - MAGIC)
            r = r if r < fnmax else fnmax
            r = r if r > F0 else F0
            lt[i, j] = r if st[_ACT, j] != F0 else F0


@njit(cache=True, error_model="numpy")
def make_qkx2_quants_lanes(xt, wt, lt, laux, st, nmax, rmin, rdelta, nstep, use_mad) -> None:
    """make_qkx2_quants on many sub-blocks of n weights at once, one sub-block per lane (column).

    xt, wt: float32 (n, lanes) weights and importances, transposed (xt[i, j] = weight i of sub-block j);
    lt, laux: float32 (n, lanes) work arrays, the codes end up in lt; st: float32 (QKX2_STATE, lanes) work
    array, results in st[_SCALE] (scale) and st[_MN] (-the_min: x ≈ scale*L + st[_MN]). Every lane follows C's
    sequence exactly (its min moves whenever a refit wins, which changes the later refits); the lanes are
    independent, so the loops over them vectorise. Lanes where nearest_int could leave its exact range
    (subnormal ranges, inf, NaN) get st[_BAD] = 1: redo those with make_qkx2_quants_ref.
    """
    fnmax = np.float32(nmax)
    _lanes_init(xt, wt, st, fnmax)
    _lanes_first_error(xt, wt, st, fnmax, use_mad)
    for s in range(nstep + 1):
        _lanes_iscale(st, np.float32(np.float32(rmin + np.float32(rdelta * np.float32(s))) + fnmax))
        _refit_sums(xt, wt, laux, st, fnmax)
        _refit_solve(st)
        if use_mad:
            _refit_errors_mad(xt, wt, laux, st)
        else:
            _refit_errors_sq(xt, wt, laux, st)
        _refit_pick(st)
    _lanes_codes(xt, lt, st, fnmax)


@njit(cache=True, error_model="numpy")
def qkx2_search(x, k0, nblk, nsub, n, av_weights, nmax, rmin, rdelta, nstep, use_mad, L, scales, mins, work, st):
    """make_qkx2_quants on every sub-block of n weights of the nblk super-blocks k0, k0+1, ... of x, counting
    super-blocks row after row (x: float32 (rows, cols), cols a multiple of QK_K; nsub*n = QK_K).

    Importance: |x| (av_weights False, Q2_K) or sqrt(mean of x^2 over the sub-block) + |x| (True, Q4_K/Q5_K).
    Writes the codes of super-block k0+g to L[g*QK_K:(g+1)*QK_K] (uint8) and the scale and the_min of its
    sub-block j to scales[g*nsub + j], mins[g*nsub + j]. work: float32 (4, n, nblk*nsub) and st: float32
    (QKX2_STATE, nblk*nsub) scratch.
    """
    nb = x.shape[1] // QK_K
    nl = nblk * nsub
    xt = work[0]
    wt = work[1]
    lt = work[2]
    for g in range(nblk):
        k = k0 + g
        xb = x[k // nb, (k % nb) * QK_K:(k % nb + 1) * QK_K]
        for i in range(n):
            for j in range(nsub):
                xt[i, g * nsub + j] = xb[n * j + i]
    if av_weights:
        s2 = st[_AUX]
        for j in range(nl):
            s2[j] = F0
        for i in range(n):
            for j in range(nl):
                s2[j] = np.float32(s2[j] + np.float32(xt[i, j] * xt[i, j]))
        fn = np.float32(n)
        for j in range(nl):
            s2[j] = np.float32(math.sqrt(np.float32(s2[j] / fn)))  # = sqrtf: sqrt rounds once either way
        for i in range(n):
            for j in range(nl):
                wt[i, j] = np.float32(s2[j] + abs(xt[i, j]))
    else:
        for i in range(n):
            for j in range(nl):
                wt[i, j] = abs(xt[i, j])
    make_qkx2_quants_lanes(xt, wt, lt, work[3], st, nmax, rmin, rdelta, nstep, use_mad)
    for j in range(nl):
        scales[j] = st[_SCALE, j]
        mins[j] = np.float32(-st[_MN, j])
    for g in range(nblk):
        for j in range(nsub):
            for i in range(n):
                L[g * QK_K + n * j + i] = np.uint8(lt[i, g * nsub + j])
    for j in range(nl):
        if st[_BAD, j] != F0:  # rare: a sub-block with a subnormal range, inf or NaN
            w = np.empty(n, dtype=np.float32)
            xs = np.empty(n, dtype=np.float32)
            for i in range(n):
                w[i] = wt[i, j]
                xs[i] = xt[i, j]
            scales[j], mins[j] = make_qkx2_quants_ref(xs, n, nmax, w, L[(j // nsub) * QK_K + n * (j % nsub):],
                                                      rmin, rdelta, nstep, use_mad)


@njit(cache=True, inline="always", error_model="numpy")
def lane_weights16(xs, j: int, lanes: int):
    """For lane j of gather_subblocks16's xs: the rmse weights w = x*x and w*x into xs[(3i+1)*lanes + j] and
    xs[(3i+2)*lanes + j], and (max |x|, the x that has it (the first one, as C), NaN if any x is inf or NaN else 0).
    Inlined into the callers' loops over lanes, which LLVM vectorises."""
    amax = F0
    mx = F0
    bad = F0
    for i in range(16):
        v = xs[3 * i * lanes + j]
        ax = abs(v)
        up = ax > amax
        amax = ax if up else amax
        mx = v if up else mx
        bad = np.float32(bad + np.float32(v * F0))  # NaN once a weight is inf or NaN
        w = np.float32(v * v)
        xs[(3 * i + 1) * lanes + j] = w
        xs[(3 * i + 2) * lanes + j] = np.float32(w * v)
    return amax, mx, bad


@njit(cache=True, inline="always", error_model="numpy")
def gather_subblocks16(x, k0: int, cnt: int, xs, group: int, lanes: int) -> None:
    """Super-blocks k0 .. k0+cnt-1 of x (counted row after row) → xs[3*i*lanes + 16*g + s] (weight i of the
    16-weight sub-block s of super-block g; zeros for g from cnt to group): the lanes of Q3_K's and Q6_K's
    searches. Inlined, so that group and lanes are the caller's compile-time constants."""
    nb = x.shape[1] // QK_K
    nsub = QK_K // 16
    for g in range(group):
        if g < cnt:
            k = k0 + g
            xb = x[k // nb, (k % nb) * QK_K:(k % nb + 1) * QK_K]
            for s in range(nsub):
                for i in range(16):
                    xs[3 * i * lanes + nsub * g + s] = xb[16 * s + i]
        else:
            for s in range(nsub):
                for i in range(16):
                    xs[3 * i * lanes + nsub * g + s] = F0


@njit(cache=True, inline="always")
def largest_magnitude(x, n: int):
    """(|v|, v) for the first v of largest magnitude among x[:n], as ggml's loops find it (ties keep the first,
    NaN never wins); (0, 0) when all are zero."""
    amax = F0
    mx = F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    return amax, mx


@njit(cache=True, inline="always")
def largest_scale_and_min(scales, mins, n: int):
    """(max(0, scales[:n]...), max(0, mins[:n]...)) as the K-quants' final passes compute them (NaN never wins)."""
    max_scale = F0
    max_min = F0
    for j in range(n):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    return max_scale, max_min


@njit(cache=True, inline="always")
def n_chunks(x) -> int:
    """Chunks of CHUNK_BLOCKS super-blocks (counted row after row) in float32 rows x."""
    return (x.shape[0] * (x.shape[1] // QK_K) + CHUNK_BLOCKS - 1) // CHUNK_BLOCKS


@njit(cache=True, error_model="numpy")
def qkx2_chunk(x, c, nsub, av_weights, nmax, rmin, rdelta, nstep, use_mad):
    """qkx2_search on chunk c of x (see n_chunks), with its own scratch: (first super-block k0, count, codes L
    (count*QK_K,), scales and mins (count*nsub,)). The loop body of every make_qkx2_quants type's quantize."""
    n = QK_K // nsub
    k0 = c * CHUNK_BLOCKS
    cnt = min(CHUNK_BLOCKS, x.shape[0] * (x.shape[1] // QK_K) - k0)
    L = np.empty(cnt * QK_K, dtype=np.uint8)
    scales = np.empty(cnt * nsub, dtype=np.float32)
    mins = np.empty(cnt * nsub, dtype=np.float32)
    work = np.empty((4, n, cnt * nsub), dtype=np.float32)
    st = np.empty((QKX2_STATE, cnt * nsub), dtype=np.float32)
    qkx2_search(x, k0, cnt, nsub, n, av_weights, nmax, rmin, rdelta, nstep, use_mad, L, scales, mins, work, st)
    return k0, cnt, L, scales, mins


@njit(cache=True, inline="always", error_model="numpy")
def requantize(x, L, o: int, n: int, d, dm, nmax: int) -> None:
    """L[o+i] = MAX(0, MIN(nmax, nearest_int((x[o+i] + dm)/d))) for i < n (the final pass of the K-quants)."""
    fnmax = np.float32(nmax)
    ok = True
    for i in range(n):
        v = np.float32(np.float32(x[o + i] + dm) / d)
        ok &= abs(v) <= NEAREST_INT_SAFE
        r = np.float32(np.float32(v + MAGIC) - MAGIC)
        r = r if r < fnmax else fnmax
        r = r if r > F0 else F0
        L[o + i] = np.uint8(r)
    if not ok:
        for i in range(n):
            L[o + i] = clamp_nearest(np.float32(np.float32(x[o + i] + dm) / d), nmax)
