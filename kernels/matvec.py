"""Fused dequantize-dot kernels for decoding (a few tokens): out (T, N) = x (T, K) @ W.T, W never dequantized.

The weights are first repacked into "planes" (`to_planes`): byte k of every block of a row lies next to byte k of
the row's next block, so a row is (block bytes, blocks) instead of (blocks, block bytes). The kernels then run
one SIMD lane per block: the loop over a row's blocks is the innermost loop and vectorizes, each lane decodes its
whole block with straight-line code, and the per-row sum stays in vector registers until the row ends. In the
stored layout the vectorized loop would run over the 32 weights of one block and end every block with a
horizontal sum: measured on 5632x2048, 2 threads, Q8_0 2.5x, Q4_0 4.7x and Q2_K 4x slower, though Q6_K was 1.4x
faster there. The bytes are the file's bytes, only reordered, so the math is
exactly that of the stored layout (see matmul.py): per block, an exact integer dot of codes times both scales.
Short rows (6 K-quant super-blocks for 1536 weights, 18 Q8_0 blocks for 576) are put side by side, a few to a
planes row (`group_size`; row groups below), so that one vector loop has enough blocks to fill its lanes; the
lanes are padded to a multiple of LANES with zero blocks (scale 0); to 16 for the types whose vector loop takes
16 blocks a step (traits.py's `lanes`; measured single-thread, 2048 and 5632 wide rows, on Zen 5 and for its
haswell target alike: Q2_K 1.6-2.0x, Q4_K 1.1-2.3x, TQ1_0/TQ2_0 1.5-3.6x, Q8_0/Q4_0/Q4_1 1.5-2.5x on rows of
576; Q3_K, Q5_K, Q6_K, Q5_0, IQ4_XS and IQ2_XXS 0.6-0.9x, so they keep 8; measured before row groups).

The activations come as planes too (`Act.planes`, repeated once per row of a group): codes (T, elements per
block, blocks), scales (T, blocks),
and per block the sum of the codes (32-weight types: to move the types' constant offsets, -8 for Q4_0, out of
the inner sums) or the sums of each 16 codes (K-quants, the same for their minimums and offsets).

Codes are multiplied and summed as int16, which is exact while a partial sum stays within +-32767 (16 products
of a 4-bit code and an activation code of at most 127; fewer for wider codes), and each partial sum is then
converted to float32; int16 lanes do twice the work of float32 ones per instruction, and converting bytes to
int16 costs less than converting them to float32 (measured: Q4_0 2.4x the float32 kernel on one core).

The block bodies are loops of constant trip count that LLVM must unroll completely for the block loop to be
the innermost one, which LLVM's default budget does not allow, so `run` compiles each kernel with a larger one.
For the 32-weight types it also lets the vectorizer size its vectors by the int16 work (16 lanes) rather than by
the float32 accumulator (8): measured Q8_0 1.1-1.6x, Q4_0 1.3-2x faster, Q5_0 about the same. Not for the
K-quants: a row of 2048 weights is only 8 super-blocks, which 16 lanes would leave to scalar code (measured Q4_K
and Q6_K 2x slower on such rows).

The kernels compile with fastmath=True (measured faster than reassoc+contract alone): NaN or inf in weights or
activations give unspecified results, where llama.cpp propagates NaN.
"""
from __future__ import annotations

import contextlib

import numpy as np
from numba import njit, prange

from qtool.formats.constants import GGMLType as G

from .common import bf2f, h2f
from .traits import TRAITS, fields

F0 = np.float32(0.0)
LANES = 8  # blocks per SIMD vector of float32 (AVX2); rows of blocks are padded to a multiple of it
# LLVM options while these kernels compile, and the defaults restored afterwards (-O3's unroll budget is 300)
COMPILE_OPTIONS = ("-unroll-threshold=4000",)
INT16_VECTORS = "-vectorizer-maximize-bandwidth"
DEFAULT_OPTIONS = ("-unroll-threshold=300", f"{INT16_VECTORS}=false")
# byte offsets of the blocks' fields, from traits.py (numba freezes them into the kernels as constants)
Q8_0_D, Q8_0_QS = fields(G.Q8_0, "d", "qs")
Q4_0_D, Q4_0_QS = fields(G.Q4_0, "d", "qs")
Q4_1_D, Q4_1_M, Q4_1_QS = fields(G.Q4_1, "d", "m", "qs")
Q5_0_D, Q5_0_QH, Q5_0_QS = fields(G.Q5_0, "d", "qh", "qs")
Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS = fields(G.Q5_1, "d", "m", "qh", "qs")
Q2_K_SCALES, Q2_K_QS, Q2_K_D, Q2_K_DMIN = fields(G.Q2_K, "scales", "qs", "d", "dmin")
Q3_K_HMASK, Q3_K_QS, Q3_K_SCALES, Q3_K_D = fields(G.Q3_K, "hmask", "qs", "scales", "d")
K4_D, K4_DMIN, K4_SCALES, Q4_K_QS = fields(G.Q4_K, "d", "dmin", "scales", "qs")
Q5_K_QH, Q5_K_QS = fields(G.Q5_K, "qh", "qs")
assert fields(G.Q5_K, "d", "dmin", "scales") == (K4_D, K4_DMIN, K4_SCALES)  # mv_q5_k reads them as Q4_K's
Q6_K_QL, Q6_K_QH, Q6_K_SCALES, Q6_K_D = fields(G.Q6_K, "ql", "qh", "scales", "d")


@njit(cache=True, inline="always")
def _f16(w, r, k, b) -> np.float32:
    """The fp16 at bytes k, k+1 of block b of row r."""
    return h2f(np.uint16(w[r, k, b]) | (np.uint16(w[r, k + 1, b]) << np.uint16(8)))


@njit(cache=True, inline="always")
def _u8(v) -> np.float32:
    # through uint8 so that LLVM converts 8-bit lanes, not the 64-bit integers numba computes in
    return np.float32(np.uint8(v))


@njit(cache=True, inline="always")
def _i16(v) -> np.int16:
    # numba computes integers in 64 bits; truncating every step lets LLVM keep the lanes 16 bits wide
    return np.int16(v)


# ---- row groups ----------------------------------------------------------------------------------------------
# A row of few blocks leaves most lanes of a vector idle (a 1536-wide Q4_K row is 6 super-blocks for 16 lanes)
# and pays the row's fixed costs for little work. So the blocks of `group` consecutive rows lie side by side
# in one planes row and one vector loop runs over all of them; each lane's block value goes to its own row's sum
# through GROUP_MAX accumulators and a select on the lane's row (`seg`), with no store inside the loop (a store
# there would keep LLVM from vectorizing it). Measured, 576x1536 Q4_K from memory, 2 threads, Zen 5: 2.3x
# faster with groups of 8.
GROUP_MAX = 8
ONE = np.float32(1.0)
ACC0 = (F0, F0, F0, F0, F0, F0, F0, F0)  # GROUP_MAX row sums


@njit(cache=True, inline="always")
def _acc(a, s, v):
    """The row sums `a` with v added to sum s (every other sum gets 0: a select, not a branch)."""
    return (a[0] + (v if s == 0 else F0), a[1] + (v if s == 1 else F0), a[2] + (v if s == 2 else F0),
            a[3] + (v if s == 3 else F0), a[4] + (v if s == 4 else F0), a[5] + (v if s == 5 else F0),
            a[6] + (v if s == 6 else F0), a[7] + (v if s == 7 else F0))


@njit(cache=True, inline="always")
def _put(out, t, r, group, a, scale) -> None:
    """The sums of planes row r's rows, times scale, into out[t] (rows past the matrix's are padding)."""
    n = out.shape[1]
    for p in range(group):
        o = r * group + p
        if o < n:
            out[t, o] = a[p] * scale


# ---- layout ------------------------------------------------------------------------------------------------------
MAX_LANES = 16  # the most any traits row pads to: activations are padded to it, so they fit every weight


def n_lanes(n_blocks: int, lanes: int = LANES) -> int:
    return -(-n_blocks // lanes) * lanes


def group_size(n_blocks: int, lanes: int = LANES, min_lanes: int = 32) -> int:
    """Rows per planes row: the fewest (1, 2, 4) whose blocks fill min_lanes lanes with at most 1/8 of padding,
    else GROUP_MAX. Rows long enough stay alone (their activations, tiled once per row of a group, would only
    grow). min_lanes is 64 for the kernels whose vectors are sized by their int16 work (twice as many lanes):
    measured from memory, 2 threads, Zen 5: 576-wide Q5_0 rows 1.75x faster in groups of 4 than alone (2 gave
    1.35x), 2048-wide Q4_K rows 2x in groups of 2 (4: 1.8x), 1536-wide Q6_K 2.6x in groups of 8 (4: 1.9x)."""
    for g in (1, 2, 4):
        if g * n_blocks >= min_lanes and n_lanes(g * n_blocks, lanes) * 8 <= g * n_blocks * 9:
            return g
    return GROUP_MAX


def lane_rows(n_blocks: int, group: int, n_lanes_: int) -> np.ndarray:
    """The row within its group of each lane (`seg`; GROUP_MAX for the padding lanes, which no sum takes)."""
    seg = np.full(n_lanes_, GROUP_MAX, np.int32)
    seg[:group * n_blocks] = np.repeat(np.arange(group, dtype=np.int32), n_blocks)
    return seg


@njit(parallel=True, cache=True)
def _transpose_blocks(q, block_bytes, group, out):
    n_rows = q.shape[0]
    n_groups, nbp = out.shape[0], out.shape[2]
    nb = q.shape[1] // block_bytes
    for g in prange(n_groups):
        for p in range(group):
            r = g * group + p
            for b in range(nb):
                for k in range(block_bytes):
                    out[g, k, p * nb + b] = q[r, b * block_bytes + k] if r < n_rows else 0
        for b in range(group * nb, nbp):
            for k in range(block_bytes):
                out[g, k, b] = 0


@njit(parallel=True, cache=True)
def _untranspose_blocks(p, n_blocks, group, out):
    n_rows = out.shape[0]
    block_bytes = p.shape[1]
    for g in prange(p.shape[0]):
        for i in range(group):
            r = g * group + i
            if r < n_rows:
                for b in range(n_blocks):
                    for k in range(block_bytes):
                        out[r, b * block_bytes + k] = p[g, k, i * n_blocks + b]


def to_planes(q: np.ndarray, block_bytes: int, lanes: int = LANES, group: int = 1) -> np.ndarray:
    """Packed rows (N, blocks * block_bytes) → planes (N / group rounded up, block_bytes, group * blocks padded
    to a multiple of lanes): lane p * blocks + b holds block b of row group * i + p (zeros past N)."""
    n, nb = q.shape[0], q.shape[1] // block_bytes
    out = np.empty((-(-n // group), block_bytes, n_lanes(group * nb, lanes)), np.uint8)
    _transpose_blocks(q, block_bytes, group, out)
    return out


def from_planes(p: np.ndarray, n_blocks: int, group: int = 1, n_rows: int | None = None) -> np.ndarray:
    """Planes back to packed rows (n_rows, default all, n_blocks * block_bytes)."""
    n = p.shape[0] * group if n_rows is None else n_rows
    out = np.empty((n, n_blocks * p.shape[1]), np.uint8)
    _untranspose_blocks(np.ascontiguousarray(p), n_blocks, group, out)
    return out


@contextlib.contextmanager
def _compile_options(int16_vectors: bool):
    import llvmlite.binding as ll
    for o in (*COMPILE_OPTIONS, f"{INT16_VECTORS}={'true' if int16_vectors else 'false'}"):
        ll.set_option("", o)
    try:
        yield
    finally:
        for o in DEFAULT_OPTIONS:
            ll.set_option("", o)


def run(kernel, *args) -> None:
    """Call a kernel of this module; its first call in a process (which compiles it, or loads numba's cache) runs
    with COMPILE_OPTIONS, which then apply to nothing else. Arguments are C-contiguous arrays, so each kernel has
    one signature."""
    if kernel.signatures:
        kernel(*args)
        return
    with _compile_options(kernel in _block32()):
        kernel(*args)


# ---- unquantized ----------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True, fastmath=True)
def mv_f16(w, x, out):
    N, K = w.shape
    T = x.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = F0
            for i in range(K):
                acc += h2f(w[r, i]) * x[t, i]
            out[t, r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def mv_bf16(w, x, out):
    N, K = w.shape
    T = x.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = F0
            for i in range(K):
                acc += bf2f(w[r, i]) * x[t, i]
            out[t, r] = acc


# ---- 32-weight blocks: w (N, block bytes, lanes); xq (T, 32, lanes) int16; xd, xs, xsum (T, lanes) ----------------
@njit(parallel=True, cache=True, fastmath=True)
def mv_q8_0(w, xq, xd, seg, group, out):
    """block_q8_0: d, qs[32] (int8). Products reach 128*127, so they are summed as int32."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                s = np.int32(0)
                for j in range(32):
                    s = np.int32(s + _i16(np.int8(w[r, Q8_0_QS + j, b]) * xq[t, j, b]))
                acc = _acc(acc, seg[b], _f16(w, r, Q8_0_D, b) * xd[t, b] * np.float32(s))
            _put(out, t, r, group, acc, ONE)


@njit(cache=True, inline="always")
def _q4_dot(w, r, b, qs, xq, t) -> np.float32:
    """Sum of the 4-bit codes (low nibbles weights 0-15, high nibbles 16-31) times the activation codes."""
    s1 = np.int16(0)
    s2 = np.int16(0)
    for j in range(16):
        v = w[r, qs + j, b]
        s1 = _i16(s1 + _i16(v & 15) * xq[t, j, b])
        s2 = _i16(s2 + _i16(v >> 4) * xq[t, 16 + j, b])
    return np.float32(s1) + np.float32(s2)


@njit(parallel=True, cache=True, fastmath=True)
def mv_q4_0(w, xq, xd, xsum, seg, group, out):
    """block_q4_0: d, qs[16]; weight j is the low nibble of qs[j], weight j+16 the high one, minus 8."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                s = _q4_dot(w, r, b, Q4_0_QS, xq, t)
                acc = _acc(acc, seg[b], _f16(w, r, Q4_0_D, b) * xd[t, b] * (s - np.float32(8.0) * xsum[t, b]))
            _put(out, t, r, group, acc, ONE)


@njit(parallel=True, cache=True, fastmath=True)
def mv_q4_1(w, xq, xd, xs, seg, group, out):
    """block_q4_1: d, m, qs[16]; weight = d * nibble + m. xs = fp16(dx * sum of codes), as Q8_1 keeps it."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                s = _q4_dot(w, r, b, Q4_1_QS, xq, t)
                acc = _acc(acc, seg[b], _f16(w, r, Q4_1_D, b) * xd[t, b] * s + _f16(w, r, Q4_1_M, b) * xs[t, b])
            _put(out, t, r, group, acc, ONE)


@njit(cache=True, inline="always")
def _qh32(w, r, k, b) -> np.uint32:
    return np.uint32(w[r, k, b]) | (np.uint32(w[r, k + 1, b]) << np.uint32(8)) \
        | (np.uint32(w[r, k + 2, b]) << np.uint32(16)) | (np.uint32(w[r, k + 3, b]) << np.uint32(24))


@njit(cache=True, inline="always")
def _q5_dot(w, r, b, qh, qs, xq, t) -> np.float32:
    """Sum of the 5-bit codes (nibble | bit of qh << 4) times the activation codes: int16 partial sums of 8."""
    s = F0
    for half in range(2):
        s1 = np.int16(0)
        s2 = np.int16(0)
        for i in range(8):
            j = 8 * half + i
            v = np.uint32(w[r, qs + j, b])
            lo = (v & np.uint32(15)) | (((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4))
            hi = (v >> np.uint32(4)) | (((qh >> np.uint32(j + 16)) & np.uint32(1)) << np.uint32(4))
            s1 = _i16(s1 + _i16(lo) * xq[t, j, b])
            s2 = _i16(s2 + _i16(hi) * xq[t, 16 + j, b])
        s += np.float32(s1) + np.float32(s2)
    return s


@njit(parallel=True, cache=True, fastmath=True)
def mv_q5_0(w, xq, xd, xsum, seg, group, out):
    """block_q5_0: d, qh (32 high bits), qs[16]; weight = 5-bit code - 16."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                s = _q5_dot(w, r, b, _qh32(w, r, Q5_0_QH, b), Q5_0_QS, xq, t)
                acc = _acc(acc, seg[b], _f16(w, r, Q5_0_D, b) * xd[t, b] * (s - np.float32(16.0) * xsum[t, b]))
            _put(out, t, r, group, acc, ONE)


@njit(parallel=True, cache=True, fastmath=True)
def mv_q5_1(w, xq, xd, xs, seg, group, out):
    """block_q5_1: d, m, qh, qs[16]; weight = d * 5-bit code + m."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                s = _q5_dot(w, r, b, _qh32(w, r, Q5_1_QH, b), Q5_1_QS, xq, t)
                acc = _acc(acc, seg[b], _f16(w, r, Q5_1_D, b) * xd[t, b] * s + _f16(w, r, Q5_1_M, b) * xs[t, b])
            _put(out, t, r, group, acc, ONE)


# ---- K-quants (256-weight super-blocks): w (N, block bytes, lanes); xq (T, 256, lanes) int16; xd (T, lanes);
# xb (T, 16, lanes) the sums of each 16 codes -----------------------------------------------------------------------
@njit(parallel=True, cache=True, fastmath=True)
def mv_q2_k(w, xq, xd, xb, seg, group, out):
    """block_q2_K (84 bytes): scales[16] (low nibble scale, high nibble min), qs[64], d, dmin."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                isum = F0
                msum = F0
                for h in range(2):
                    for k in range(4):
                        for half in range(2):
                            sc = w[r, Q2_K_SCALES + 8 * h + 2 * k + half, b]
                            e0 = 128 * h + 32 * k + 16 * half
                            s = np.int16(0)
                            for l in range(16):
                                q = (w[r, Q2_K_QS + 32 * h + 16 * half + l, b] >> (2 * k)) & 3
                                s = _i16(s + _i16(q) * xq[t, e0 + l, b])
                            isum += _u8(sc & 15) * np.float32(s)
                            msum += _u8(sc >> 4) * xb[t, e0 // 16, b]
                acc = _acc(acc, seg[b], xd[t, b] * (_f16(w, r, Q2_K_D, b) * isum - _f16(w, r, Q2_K_DMIN, b) * msum))
            _put(out, t, r, group, acc, ONE)


@njit(cache=True, inline="always")
def _q3_scale(w, r, b, j) -> np.float32:
    """6-bit scale j (0..15) of a block_q3_K, minus 32 (scales[12] at byte 96). The layout is documented at
    q3_k._scale, which reads it from packed rows; this one reads planes (byte k of block b at [r, k, b])."""
    s = Q3_K_SCALES
    if j < 4:
        v = (w[r, s + j, b] & 15) | ((w[r, s + 8 + j, b] & 3) << 4)
    elif j < 8:
        v = (w[r, s + j, b] & 15) | (((w[r, s + 4 + j, b] >> 2) & 3) << 4)
    elif j < 12:
        v = (w[r, s + j - 8, b] >> 4) | (((w[r, s + j, b] >> 4) & 3) << 4)
    else:
        v = (w[r, s + j - 8, b] >> 4) | (((w[r, s + j - 4, b] >> 6) & 3) << 4)
    return _u8(v) - np.float32(32.0)


@njit(parallel=True, cache=True, fastmath=True)
def mv_q3_k(w, xq, xd, xb, seg, group, out):
    """block_q3_K (110 bytes): hmask[32], qs[64], scales[12], d. Weight = 2 low bits + 4 * hmask bit - 4."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                isum = F0
                for n in range(2):
                    for j in range(4):
                        for half in range(2):
                            e0 = 128 * n + 32 * j + 16 * half
                            s = np.int16(0)
                            for l in range(16):
                                lo = (w[r, Q3_K_QS + 32 * n + 16 * half + l, b] >> (2 * j)) & 3
                                hb = (w[r, Q3_K_HMASK + 16 * half + l, b] >> (4 * n + j)) & 1
                                s = _i16(s + _i16(lo | (hb << 2)) * xq[t, e0 + l, b])
                            isum += _q3_scale(w, r, b, 8 * n + 2 * j + half) \
                                * (np.float32(s) - np.float32(4.0) * xb[t, e0 // 16, b])
                acc = _acc(acc, seg[b], xd[t, b] * _f16(w, r, Q3_K_D, b) * isum)
            _put(out, t, r, group, acc, ONE)


@njit(cache=True, inline="always")
def _scale_min_k4(w, r, b, j):
    """6-bit scale and min j (0..7) of a block_q4_K/q5_K (scales[12] at byte 4), from planes; the layout is
    kquant_k4.get_scale_min_k4's (packed rows)."""
    p = K4_SCALES
    if j < 4:
        return _u8(w[r, p + j, b] & 63), _u8(w[r, p + j + 4, b] & 63)
    sc = (w[r, p + j + 4, b] & 15) | ((w[r, p + j - 4, b] >> 6) << 4)
    m = (w[r, p + j + 4, b] >> 4) | ((w[r, p + j, b] >> 6) << 4)
    return _u8(sc), _u8(m)


@njit(parallel=True, cache=True, fastmath=True)
def mv_q4_k(w, xq, xd, xb, seg, group, out):
    """block_q4_K (144 bytes): d, dmin, scales[12], qs[128]; weight = d * sc * nibble - dmin * m."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                isum = F0
                msum = F0
                for k in range(4):
                    sc1, m1 = _scale_min_k4(w, r, b, 2 * k)
                    sc2, m2 = _scale_min_k4(w, r, b, 2 * k + 1)
                    s1 = F0
                    s2 = F0
                    for half in range(2):
                        p1 = np.int16(0)
                        p2 = np.int16(0)
                        for i in range(16):
                            l = 16 * half + i
                            v = w[r, Q4_K_QS + 32 * k + l, b]
                            p1 = _i16(p1 + _i16(v & 15) * xq[t, 64 * k + l, b])
                            p2 = _i16(p2 + _i16(v >> 4) * xq[t, 64 * k + 32 + l, b])
                        s1 += np.float32(p1)
                        s2 += np.float32(p2)
                    isum += sc1 * s1 + sc2 * s2
                    msum += m1 * (xb[t, 4 * k, b] + xb[t, 4 * k + 1, b]) + m2 * (xb[t, 4 * k + 2, b] + xb[t, 4 * k + 3, b])
                acc = _acc(acc, seg[b], xd[t, b] * (_f16(w, r, K4_D, b) * isum - _f16(w, r, K4_DMIN, b) * msum))
            _put(out, t, r, group, acc, ONE)


@njit(parallel=True, cache=True, fastmath=True)
def mv_q5_k(w, xq, xd, xb, seg, group, out):
    """block_q5_K (176 bytes): d, dmin, scales[12], qh[32], qs[128]; 5-bit codes, as Q4_K otherwise."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                isum = F0
                msum = F0
                for k in range(4):
                    sc1, m1 = _scale_min_k4(w, r, b, 2 * k)
                    sc2, m2 = _scale_min_k4(w, r, b, 2 * k + 1)
                    s1 = F0
                    s2 = F0
                    for part in range(4):
                        p1 = np.int16(0)
                        p2 = np.int16(0)
                        for i in range(8):
                            l = 8 * part + i
                            v = w[r, Q5_K_QS + 32 * k + l, b]
                            h = w[r, Q5_K_QH + l, b]
                            p1 = _i16(p1 + _i16((v & 15) | (((h >> (2 * k)) & 1) << 4)) * xq[t, 64 * k + l, b])
                            p2 = _i16(p2 + _i16((v >> 4) | (((h >> (2 * k + 1)) & 1) << 4)) * xq[t, 64 * k + 32 + l, b])
                        s1 += np.float32(p1)
                        s2 += np.float32(p2)
                    isum += sc1 * s1 + sc2 * s2
                    msum += m1 * (xb[t, 4 * k, b] + xb[t, 4 * k + 1, b]) + m2 * (xb[t, 4 * k + 2, b] + xb[t, 4 * k + 3, b])
                acc = _acc(acc, seg[b], xd[t, b] * (_f16(w, r, K4_D, b) * isum - _f16(w, r, K4_DMIN, b) * msum))
            _put(out, t, r, group, acc, ONE)


@njit(parallel=True, cache=True, fastmath=True)
def mv_q6_k(w, xq, xd, xb, seg, group, out):
    """block_q6_K (210 bytes): ql[128], qh[64], scales[16] (int8), d; weight = d * sc * (6-bit code - 32).
    The codes are recentred to -32..31 in int16, so partial sums of 8 stay within int16."""
    N, nbp = w.shape[0], w.shape[2]
    T = xq.shape[0]
    for r in prange(N):
        for t in range(T):
            acc = ACC0
            for b in range(nbp):
                isum = F0
                for n in range(2):
                    for half in range(2):
                        e0 = 128 * n + 16 * half
                        s1 = F0
                        s2 = F0
                        s3 = F0
                        s4 = F0
                        for part in range(2):
                            p1 = np.int16(0)
                            p2 = np.int16(0)
                            p3 = np.int16(0)
                            p4 = np.int16(0)
                            for i in range(8):
                                l = 16 * half + 8 * part + i
                                e = e0 + 8 * part + i
                                a = w[r, Q6_K_QL + 64 * n + l, b]
                                c = w[r, Q6_K_QL + 64 * n + 32 + l, b]
                                h = w[r, Q6_K_QH + 32 * n + l, b]
                                p1 = _i16(p1 + _i16(_i16((a & 15) | ((h & 3) << 4)) - 32) * xq[t, e, b])
                                p2 = _i16(p2 + _i16(_i16((c & 15) | (((h >> 2) & 3) << 4)) - 32) * xq[t, e + 32, b])
                                p3 = _i16(p3 + _i16(_i16((a >> 4) | (((h >> 4) & 3) << 4)) - 32) * xq[t, e + 64, b])
                                p4 = _i16(p4 + _i16(_i16((c >> 4) | (((h >> 6) & 3) << 4)) - 32) * xq[t, e + 96, b])
                            s1 += np.float32(p1)
                            s2 += np.float32(p2)
                            s3 += np.float32(p3)
                            s4 += np.float32(p4)
                        sp = Q6_K_SCALES + 8 * n + half
                        isum += np.float32(np.int8(w[r, sp, b])) * s1 + np.float32(np.int8(w[r, sp + 2, b])) * s2 \
                            + np.float32(np.int8(w[r, sp + 4, b])) * s3 + np.float32(np.int8(w[r, sp + 6, b])) * s4
                acc = _acc(acc, seg[b], xd[t, b] * _f16(w, r, Q6_K_D, b) * isum)
            _put(out, t, r, group, acc, ONE)


# the 32-weight types' kernels, compiled with int16-sized vectors
_BLOCK32_KERNELS: list = []


def _block32() -> list:
    """The kernels compiled with int16-sized vectors (traits.py's int16_vectors), looked up at first use: a
    type's kernel may live in its codec's module, which imports this one."""
    if not _BLOCK32_KERNELS:
        _BLOCK32_KERNELS.extend(r.fused_kernel() for r in TRAITS.values() if r.int16_vectors)
    return _BLOCK32_KERNELS
