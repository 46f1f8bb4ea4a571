"""The searches of llama.cpp's importance-weighted quantizers (ggml_quantize_chunk with an imatrix): make_qx_quants
with given weights, make_qkx3_quants and make_qp_quants, and the per-row importance weights of the types that
mix the imatrix with the row's spread.

Speed (they run once per conversion, each codec's kernel parallel over rows or chunks of super-blocks):
make_qx_quants_w accumulates its 19 independent trial scales side by side in one pass over the group;
make_qkx3_quants with weights is make_qkx2_quants step for step, so `qkx3_many` runs many sub-blocks at once on
kquant_common's make_qkx2_quants_lanes (one sub-block per lane). Both fall back to the plain transcriptions here
(make_qx_quants_w_ref, make_qkx3_quants) where nearest_int could leave its exact range, or on inf and NaN.
Measured on 4096x4096 (2 threads, a shared machine): 17-36 Mparam/s, 1.1-1.4x llama.cpp's ggml_quantize_chunk
on two threads for the make_qx_quants types (Q4_0, Q5_0, Q3_K, Q6_K) and 3.5-4x for the make_qkx3_quants ones.

Bit-exactness as in kquant_common: float32 arithmetic one rounding per operation in C's order and association
(`w*x*l` is (w*x)*l; `w*diff*diff` in make_qp_quants is (w*diff)*diff but make_qkx3_quants squares diff first),
no fused multiply-add, ggml's nearest_int (kquant_common.ggml_nearest_int, also past its exact range), C's
uint8_t stores keeping the low byte.
make_qkx3_quants' min moves with every winning refit, and the later trials' range (max - min) with it.

numba's cache keys a function on its own file only; this module is in kernels/__init__.py's _SHARED_SOURCES.
"""
import numpy as np
from numba import njit

from .kquant_common import (_BAD, _MN, _SCALE, CHUNK_BLOCKS, F0, F1, MAGIC, NEAREST_INT_SAFE, QK_K, QKX2_STATE,
                            clamp_nearest, ggml_nearest_int, largest_magnitude, make_qkx2_quants_lanes,
                            refit_scale_min)

GROUP_MAX_EPS = np.float32(1e-15)
INF = np.float32(np.inf)
TENTH = np.float32(0.1)


@njit(cache=True, inline="always", error_model="numpy")
def _clamp(l: int, lo: int, hi: int) -> int:
    return lo if l < lo else (hi if l > hi else l)


NTRY = 19  # make_qx_quants' first scale, then is = -9..-1, 1..9
QX_SCRATCH = 3 * NTRY


@njit(cache=True, inline="always", error_model="numpy")
def _group_max(x, o: int, n: int, L, lo: int) -> np.float32:
    """make_qx_quants' start: the signed value of largest magnitude in x[o:o+n], or 0 (its codes L[lo:lo+n]
    zeroed) when that magnitude is below GROUP_MAX_EPS."""
    amax, mx = largest_magnitude(x[o:o + n], n)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[lo + i] = 0
        return F0
    return mx


@njit(cache=True, error_model="numpy")
def make_qx_quants_w(x, o: int, n: int, nmax: int, L, lo: int, qw, wo: int, ts) -> np.float32:
    """make_qx_quants(n, nmax, x+o, L+lo, rmse_type=1, qw+wo): codes nmax + clamp(l, -nmax, nmax-1) into
    L[lo:lo+n], returns the scale. ts: float32 (QX_SCRATCH,) scratch.

    The 19 trial scales' sums do not depend on each other (only which one wins does), so they are accumulated
    side by side, one pass over the weights, each in C's order; the winner is then picked in C's order. Where
    some iscale*x falls outside nearest_int's exact range (or is NaN) make_qx_quants_w_ref redoes the group."""
    mx = _group_max(x, o, n, L, lo)
    if mx == F0:
        return F0
    fnmax = np.float32(nmax)
    ntry = ts.shape[0] // 3  # NTRY, opaque to LLVM (a known count would be unrolled into scalar code)
    ts[0] = np.float32(-fnmax / mx)
    for t in range(1, ntry):
        is_ = t - 10 if t < 10 else t - 9
        ts[t] = np.float32(-np.float32(fnmax + np.float32(TENTH * np.float32(is_))) / mx)
    for t in range(ntry):
        ts[ntry + t] = F0
        ts[2 * ntry + t] = F0
    lo_l = -fnmax
    hi_l = np.float32(nmax - 1)
    ok = True
    for i in range(n):
        xi = x[o + i]
        wi = qw[wo + i]
        wx = np.float32(wi * xi)
        for t in range(ntry):
            v = np.float32(ts[t] * xi)
            ok &= abs(v) <= NEAREST_INT_SAFE
            r = np.float32(np.float32(v + MAGIC) - MAGIC)
            r = r if r > lo_l else lo_l
            r = r if r < hi_l else hi_l
            ts[ntry + t] = np.float32(ts[ntry + t] + np.float32(wx * r))
            ts[2 * ntry + t] = np.float32(ts[2 * ntry + t] + np.float32(np.float32(wi * r) * r))
    if not ok:
        return make_qx_quants_w_ref(x, o, n, nmax, L, lo, qw, wo)
    sumlx = ts[ntry]
    suml2 = ts[2 * ntry]
    scale = np.float32(sumlx / suml2) if suml2 != F0 else F0
    best = np.float32(scale * sumlx)
    win = 0
    for t in range(1, ntry):
        sumlx = ts[ntry + t]
        suml2 = ts[2 * ntry + t]
        if suml2 > F0 and np.float32(sumlx * sumlx) > np.float32(best * suml2):
            win = t
            scale = np.float32(sumlx / suml2)
            best = np.float32(scale * sumlx)
    iscale = ts[win]
    for i in range(n):
        L[lo + i] = nmax + _clamp(ggml_nearest_int(np.float32(iscale * x[o + i])), -nmax, nmax - 1)
    return scale


@njit(cache=True, error_model="numpy")
def make_qx_quants_w_ref(x, o: int, n: int, nmax: int, L, lo: int, qw, wo: int) -> np.float32:
    """make_qx_quants(n, nmax, x+o, L+lo, rmse_type=1, qw+wo), plainly transcribed."""
    mx = _group_max(x, o, n, L, lo)
    if mx == F0:
        return F0
    fnmax = np.float32(nmax)
    iscale = np.float32(-fnmax / mx)
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = _clamp(ggml_nearest_int(np.float32(iscale * x[o + i])), -nmax, nmax - 1)
        L[lo + i] = l + nmax
        w = qw[wo + i]
        fl = np.float32(l)
        sumlx = np.float32(sumlx + np.float32(np.float32(w * x[o + i]) * fl))
        suml2 = np.float32(suml2 + np.float32(np.float32(w * fl) * fl))
    scale = np.float32(sumlx / suml2) if suml2 != F0 else F0
    best = np.float32(scale * sumlx)
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = np.float32(-np.float32(fnmax + np.float32(TENTH * np.float32(is_))) / mx)
        sumlx = F0
        suml2 = F0
        for i in range(n):
            fl = np.float32(_clamp(ggml_nearest_int(np.float32(iscale * x[o + i])), -nmax, nmax - 1))
            w = qw[wo + i]
            sumlx = np.float32(sumlx + np.float32(np.float32(w * x[o + i]) * fl))
            suml2 = np.float32(suml2 + np.float32(np.float32(w * fl) * fl))
        if suml2 > F0 and np.float32(sumlx * sumlx) > np.float32(best * suml2):
            for i in range(n):
                L[lo + i] = nmax + _clamp(ggml_nearest_int(np.float32(iscale * x[o + i])), -nmax, nmax - 1)
            scale = np.float32(sumlx / suml2)
            best = np.float32(scale * sumlx)
    return scale


@njit(cache=True, error_model="numpy")
def make_qkx3_quants(x, o: int, n: int, nmax: int, w, wo: int, L, lo: int, Laux, rmin, rdelta, nstep: int):
    """make_qkx3_quants(n, nmax, x+o, w+wo, L+lo, &the_min, Laux, rmin, rdelta, nstep, use_mad=false):
    codes 0..nmax into L[lo:lo+n]; returns (scale, the_min) with x ≈ scale*L - the_min."""
    mn = x[o]
    mx = x[o]
    sum_w = w[wo]
    sum_x = np.float32(sum_w * x[o])
    for i in range(1, n):
        v = x[o + i]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
        wi = w[wo + i]
        sum_w = np.float32(sum_w + wi)
        sum_x = np.float32(sum_x + np.float32(wi * v))
    if mn > F0:
        mn = F0
    if mx <= mn:
        for i in range(n):
            L[lo + i] = 0
        return F0, -mn
    fnmax = np.float32(nmax)
    iscale = np.float32(fnmax / np.float32(mx - mn))
    scale = np.float32(F1 / iscale)
    best_mad = F0
    for i in range(n):
        l = clamp_nearest(np.float32(iscale * np.float32(x[o + i] - mn)), nmax)
        L[lo + i] = l
        diff = np.float32(np.float32(np.float32(scale * np.float32(l)) + mn) - x[o + i])
        best_mad = np.float32(best_mad + np.float32(w[wo + i] * np.float32(diff * diff)))
    if nstep < 1:
        return scale, -mn
    for is_ in range(nstep + 1):
        # min moves with every winning refit, and the next trials' range and offsets with it (as in C)
        iscale = np.float32(np.float32(np.float32(rmin + np.float32(rdelta * np.float32(is_))) + fnmax)
                            / np.float32(mx - mn))
        sum_l = F0
        sum_l2 = F0
        sum_xl = F0
        for i in range(n):
            l = clamp_nearest(np.float32(iscale * np.float32(x[o + i] - mn)), nmax)
            Laux[i] = l
            wl = np.float32(w[wo + i] * np.float32(l))
            sum_l = np.float32(sum_l + wl)
            sum_l2 = np.float32(sum_l2 + np.float32(wl * np.float32(l)))
            sum_xl = np.float32(sum_xl + np.float32(wl * x[o + i]))
        D = np.float32(np.float32(sum_w * sum_l2) - np.float32(sum_l * sum_l))
        if D > F0:
            this_scale, this_min = refit_scale_min(sum_w, sum_x, sum_l, sum_l2, sum_xl, D)
            mad = F0
            for i in range(n):
                diff = np.float32(np.float32(np.float32(this_scale * np.float32(Laux[i])) + this_min) - x[o + i])
                mad = np.float32(mad + np.float32(w[wo + i] * np.float32(diff * diff)))
            if mad < best_mad:
                for i in range(n):
                    L[lo + i] = Laux[i]
                best_mad = mad
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True, error_model="numpy")
def make_qp_quants(n: int, nmax: int, x, L, qw) -> np.float32:
    """make_qp_quants(n, nmax, x, L, quant_weights): codes of the non-negative x[:n] (the sub-block scales or
    mins) into uint8 L[:n], returns their scale."""
    mx = F0
    for i in range(n):
        mx = mx if mx > x[i] else x[i]  # MAX(max, x[i])
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    fnmax = np.float32(nmax)
    iscale = np.float32(fnmax / mx)
    for i in range(n):
        L[i] = ggml_nearest_int(np.float32(iscale * x[i])) & 0xFF
    scale = np.float32(F1 / iscale)
    best_mse = F0
    for i in range(n):
        diff = np.float32(x[i] - np.float32(scale * np.float32(L[i])))
        best_mse = np.float32(best_mse + np.float32(np.float32(qw[i] * diff) * diff))
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = np.float32(np.float32(np.float32(TENTH * np.float32(is_)) + fnmax) / mx)
        scale_is = np.float32(F1 / iscale_is)
        mse = F0
        for i in range(n):
            l = min(nmax, ggml_nearest_int(np.float32(iscale_is * x[i])))
            diff = np.float32(x[i] - np.float32(scale_is * np.float32(l)))
            mse = np.float32(mse + np.float32(np.float32(qw[i] * diff) * diff))
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = min(nmax, ggml_nearest_int(np.float32(iscale * x[i])))
        L[i] = l & 0xFF
        w = qw[i]
        fl = np.float32(l)
        sumlx = np.float32(sumlx + np.float32(np.float32(w * x[i]) * fl))
        suml2 = np.float32(suml2 + np.float32(np.float32(w * fl) * fl))
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            li = np.int32(L[i])
            fli = np.float32(li)
            slx = np.float32(sumlx - np.float32(np.float32(w * x[i]) * fli))
            sl2 = np.float32(suml2 - np.float32(np.float32(w * fli) * fli))
            if slx > F0 and sl2 > F0:
                new_l = min(nmax, ggml_nearest_int(np.float32(np.float32(x[i] * sl2) / slx)))
                if new_l != li:
                    fnl = np.float32(new_l)
                    slx = np.float32(slx + np.float32(np.float32(w * x[i]) * fnl))
                    sl2 = np.float32(sl2 + np.float32(np.float32(w * fnl) * fnl))
                    if np.float32(np.float32(slx * slx) * suml2) > np.float32(np.float32(sumlx * sumlx) * sl2):
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return np.float32(sumlx / suml2) if suml2 > F0 else F0


@njit(cache=True, error_model="numpy")
def sigma2_weights(x, o: int, n: int, sigma2, qw, wo: int, weight) -> None:
    """weight[i] = qw[wo+i] * sqrtf(sigma2 + x[o+i]*x[o+i]) for i < n (the legacy types, Q2_K, Q3_K...)."""
    for i in range(n):
        v = x[o + i]
        root = np.float32(np.sqrt(np.float32(sigma2 + np.float32(v * v))))
        weight[i] = np.float32(qw[wo + i] * root)


@njit(cache=True, error_model="numpy")
def sum_squares(x, o: int, n: int) -> np.float32:
    """The float32 sum of x[o+i]^2, i < n, in order."""
    s = F0
    for i in range(n):
        v = x[o + i]
        s = np.float32(s + np.float32(v * v))
    return s


@njit(cache=True, error_model="numpy")
def mean_square(x, o: int, n: int) -> np.float32:
    """sum_x2/n (sigma2 of the legacy types and Q2_K)."""
    return np.float32(sum_squares(x, o, n) / np.float32(n))


@njit(cache=True, error_model="numpy")
def twice_mean_square(x, o: int, n: int) -> np.float32:
    """2*sum_x2/n (sigma2 of Q3_K, Q4_K, Q5_K)."""
    return np.float32(np.float32(np.float32(2.0) * sum_squares(x, o, n)) / np.float32(n))


@njit(cache=True, error_model="numpy")
def weights_and_sum(x, o: int, n: int, sigma2, qw, wo: int, weight) -> np.float32:
    """sigma2_weights, then their float32 sum in order (the sub-block's weight in make_qp_quants)."""
    sigma2_weights(x, o, n, sigma2, qw, wo, weight)
    s = F0
    for i in range(n):
        s = np.float32(s + weight[i])
    return s


QKX3_RMIN = np.float32(-0.9)  # every weighted caller of make_qkx3_quants searches with these
QKX3_RDELTA = np.float32(0.05)
QKX3_NSTEP = 36


@njit(cache=True, error_model="numpy")
def qkx3_many(xf, wf, nl: int, n: int, nmax: int, L, scales, mins) -> None:
    """make_qkx3_quants(n, nmax, ..., -0.9, 0.05, 36) on the nl consecutive sub-blocks of n weights xf[:nl*n]
    with weights wf[:nl*n]: codes into L[:nl*n], scale and the_min of sub-block j into scales[j], mins[j].

    With weights given, make_qkx3_quants is make_qkx2_quants step for step (max <= min and max == min agree:
    min <= max unless x[0] is NaN, and then both are false), so the sub-blocks go through kquant_common's
    make_qkx2_quants_lanes, one per lane; lanes it flags (ranges where nearest_int leaves its exact range, inf,
    NaN) and lanes with a weight that is inf or NaN (a row holding inf makes sigma2 inf) are redone by
    make_qkx3_quants."""
    work = np.empty((4, n, nl), dtype=np.float32)
    st = np.empty((QKX2_STATE, nl), dtype=np.float32)
    xt = work[0]
    wt = work[1]
    lt = work[2]
    for j in range(nl):
        for i in range(n):
            xt[i, j] = xf[n * j + i]
            wt[i, j] = wf[n * j + i]
    make_qkx2_quants_lanes(xt, wt, lt, work[3], st, nmax, QKX3_RMIN, QKX3_RDELTA, QKX3_NSTEP, False)
    for j in range(nl):
        scales[j] = st[_SCALE, j]
        mins[j] = np.float32(-st[_MN, j])
        for i in range(n):
            L[n * j + i] = np.uint8(lt[i, j])
    laux = np.empty(n, dtype=np.uint8)
    for j in range(nl):
        bad = st[_BAD, j] != F0
        for i in range(n):  # the lanes' own checks look at x only (their weights came from x)
            bad |= not abs(wf[n * j + i]) < INF
        if bad:
            scales[j], mins[j] = make_qkx3_quants(xf, n * j, n, nmax, wf, n * j, L, n * j, laux, QKX3_RMIN,
                                                  QKX3_RDELTA, QKX3_NSTEP)


@njit(cache=True, error_model="numpy")
def kquant_chunk_weighted(x, qw, c: int, nsub: int, nmax: int, twice: bool):
    """The sub-block searches of the weighted Q2_K (nsub 16, twice False), Q4_K, Q5_K (nsub 8, twice True) on
    chunk c of CHUNK_BLOCKS super-blocks of x (counted row after row): per super-block sigma2 = (2*)mean x^2,
    weights qw*sqrtf(sigma2 + x^2), make_qkx3_quants on each sub-block. Returns (first super-block k0, count,
    codes L, scales, mins, sums of weights sw) (per sub-block, super-block after super-block)."""
    n = QK_K // nsub
    nb = x.shape[1] // QK_K
    k0 = c * CHUNK_BLOCKS
    cnt = min(CHUNK_BLOCKS, x.shape[0] * nb - k0)
    xf = np.empty(cnt * QK_K, dtype=np.float32)
    wf = np.empty(cnt * QK_K, dtype=np.float32)
    sw = np.empty(cnt * nsub, dtype=np.float32)
    for g in range(cnt):
        k = k0 + g
        r = k // nb
        b = k % nb
        xb = x[r, b * QK_K:(b + 1) * QK_K]
        for i in range(QK_K):
            xf[g * QK_K + i] = xb[i]
        sigma2 = twice_mean_square(xb, 0, QK_K) if twice else mean_square(xb, 0, QK_K)
        for j in range(nsub):
            sw[g * nsub + j] = weights_and_sum(xb, n * j, n, sigma2, qw, b * QK_K + n * j, wf[g * QK_K + n * j:])
    L = np.empty(cnt * QK_K, dtype=np.uint8)
    scales = np.empty(cnt * nsub, dtype=np.float32)
    mins = np.empty(cnt * nsub, dtype=np.float32)
    qkx3_many(xf, wf, cnt * nsub, n, nmax, L, scales, mins)
    return k0, cnt, L, scales, mins, sw
