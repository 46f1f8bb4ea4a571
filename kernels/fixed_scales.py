"""A quantized block's grid with its scales held fixed: read every weight's step and offset from a block's scale
fields, round values to that grid, and write codes back into the block without touching its scales.

GPTQ (qtool/gptq.py) chooses a super-block's scales once, from the error-updated weights, then rounds one
column at a time against them while the rounding error of each column is fed forward to the later ones. That
needs, per type, what no codec offers on its own: "the grid of this block" and "pack these codes under this
block's scales". Every uniform type's weight is a*k + c for an integer k in [KMIN, KMAX]:

    Q8_0  a = d            c = 0          k in -127..127
    Q4_0  a = d            c = 0          k in -8..7      (stored k + 8)
    Q4_1  a = d            c = m          k in 0..15
    Q5_0  a = d            c = 0          k in -16..15    (stored k + 16)
    Q5_1  a = d            c = m          k in 0..31
    Q2_K  a = d*sc         c = -(dmin*m)  k in 0..3       (sub-blocks of 16, 4-bit sc and m)
    Q3_K  a = d*(sc-32)    c = 0          k in -4..3      (sub-blocks of 16, 6-bit sc; stored k + 4)
    Q4_K  a = d*sc         c = -(dmin*m)  k in 0..15      (sub-blocks of 32, 6-bit sc and m)
    Q5_K  a = d*sc         c = -(dmin*m)  k in 0..31
    Q6_K  a = d*sc         c = 0          k in -32..31    (sub-blocks of 16, int8 sc; stored k + 32)

with a and c computed in float32 as ggml's dequantizers compute them, so a*k + c is the dequantized weight bit
for bit. Per type: `grid_<type>(q, A, C, K)` fills the step, offset and current code of every weight of packed
rows q, and `pack_<type>(q, K)` writes codes K into q's code fields. `round_to_grid` is the rounding the K-quant
codecs do once their scales are final (nearest_int((x - c) / a), clamped; a weight whose step is 0 keeps its
code, as the codecs keep the search's codes of a sub-block whose scale rounded to 0).

Layouts are traits.py's field offsets, read as the codecs read them; as legacy.py explains, numba caches neither
factory closures nor kernels taking kernels, so each type has its own pair, sharing inlined block readers. The
helpers here import only from common.py (in kernels/__init__.py's _SHARED_SOURCES), so this file's cache is
keyed on everything it inlines.
"""
import numpy as np
from numba import njit, prange

from qtool.formats.constants import GGMLType

from .common import load_fp16, nearest_int
from .traits import block, fields

F0 = np.float32(0.0)
QK_K = 256

# (KMIN, KMAX) of each type's integer k (the weight is a*k + c)
K_RANGE = {GGMLType.Q8_0: (-127, 127), GGMLType.Q4_0: (-8, 7), GGMLType.Q4_1: (0, 15), GGMLType.Q5_0: (-16, 15),
           GGMLType.Q5_1: (0, 31), GGMLType.Q2_K: (0, 3), GGMLType.Q3_K: (-4, 3), GGMLType.Q4_K: (0, 15),
           GGMLType.Q5_K: (0, 31), GGMLType.Q6_K: (-32, 31)}


@njit(cache=True, error_model="numpy", parallel=True)
def round_to_grid(x, A, C, K, kmin: int, kmax: int) -> None:
    """K[r, j] = clamp(nearest_int((x - c) / a), kmin, kmax) where a != 0 (float32, C's order); kept where a == 0."""
    for r in prange(x.shape[0]):
        for j in range(x.shape[1]):
            a = A[r, j]
            if a == F0:
                continue
            k = nearest_int(np.float32(np.float32(x[r, j] - C[r, j]) / a))
            K[r, j] = kmin if k < kmin else (kmax if k > kmax else k)


# ---- legacy blocks of 32 --------------------------------------------------------------------------------------------

@njit(cache=True, inline="always", error_model="numpy")
def _legacy_grid(q, A, C, K, bb: int, has_min: bool, five: bool, koff: int) -> None:
    qh_at = 4 if has_min else 2
    qs_at = qh_at + (4 if five else 0)
    for r in prange(q.shape[0]):
        for b in range(A.shape[1] // 32):
            o = b * bb
            d = load_fp16(q[r], o)
            m = load_fp16(q[r], o + 2) if has_min else F0
            qh = np.uint32(0)
            if five:
                for i in range(4):
                    qh |= np.uint32(q[r, o + qh_at + i]) << np.uint32(8 * i)
            for j in range(32):
                v = np.int64((q[r, o + qs_at + (j & 15)] >> (4 * (j >> 4))) & 0xF)
                if five:
                    v |= np.int64((qh >> np.uint32(j)) & np.uint32(1)) << 4
                A[r, 32 * b + j] = d
                C[r, 32 * b + j] = m
                K[r, 32 * b + j] = v - koff


@njit(cache=True, inline="always", error_model="numpy")
def _legacy_pack(q, K, bb: int, has_min: bool, five: bool, koff: int) -> None:
    qh_at = 4 if has_min else 2
    qs_at = qh_at + (4 if five else 0)
    for r in prange(q.shape[0]):
        for b in range(K.shape[1] // 32):
            o = b * bb
            qh = np.uint32(0)
            for j in range(16):
                lo = np.int64(K[r, 32 * b + j] + koff)
                hi = np.int64(K[r, 32 * b + 16 + j] + koff)
                q[r, o + qs_at + j] = (lo & 0xF) | ((hi & 0xF) << 4)
                if five:
                    qh |= np.uint32((lo >> 4) & 1) << np.uint32(j)
                    qh |= np.uint32((hi >> 4) & 1) << np.uint32(j + 16)
            if five:
                for i in range(4):
                    q[r, o + qh_at + i] = (qh >> np.uint32(8 * i)) & np.uint32(0xFF)


_Q40 = block(GGMLType.Q4_0)[1]
_Q41 = block(GGMLType.Q4_1)[1]
_Q50 = block(GGMLType.Q5_0)[1]
_Q51 = block(GGMLType.Q5_1)[1]
assert fields(GGMLType.Q4_1, "m", "qs") == (2, 4) and fields(GGMLType.Q5_0, "qh", "qs") == (2, 6)
assert fields(GGMLType.Q5_1, "m", "qh", "qs") == (2, 4, 8) and fields(GGMLType.Q4_0, "qs") == (2,)


@njit(cache=True, parallel=True, error_model="numpy")
def grid_q4_0(q, A, C, K):
    _legacy_grid(q, A, C, K, _Q40, False, False, 8)


@njit(cache=True, parallel=True, error_model="numpy")
def pack_q4_0(q, K):
    _legacy_pack(q, K, _Q40, False, False, 8)


@njit(cache=True, parallel=True, error_model="numpy")
def grid_q4_1(q, A, C, K):
    _legacy_grid(q, A, C, K, _Q41, True, False, 0)


@njit(cache=True, parallel=True, error_model="numpy")
def pack_q4_1(q, K):
    _legacy_pack(q, K, _Q41, True, False, 0)


@njit(cache=True, parallel=True, error_model="numpy")
def grid_q5_0(q, A, C, K):
    _legacy_grid(q, A, C, K, _Q50, False, True, 16)


@njit(cache=True, parallel=True, error_model="numpy")
def pack_q5_0(q, K):
    _legacy_pack(q, K, _Q50, False, True, 16)


@njit(cache=True, parallel=True, error_model="numpy")
def grid_q5_1(q, A, C, K):
    _legacy_grid(q, A, C, K, _Q51, True, True, 0)


@njit(cache=True, parallel=True, error_model="numpy")
def pack_q5_1(q, K):
    _legacy_pack(q, K, _Q51, True, True, 0)


# ---- Q8_0 -------------------------------------------------------------------------------------------------------

_Q8, _Q8_QS = block(GGMLType.Q8_0)[1], fields(GGMLType.Q8_0, "qs")[0]


@njit(cache=True, parallel=True, error_model="numpy")
def grid_q8_0(q, A, C, K):
    for r in prange(q.shape[0]):
        for b in range(A.shape[1] // 32):
            o = b * _Q8
            d = load_fp16(q[r], o)
            for j in range(32):
                A[r, 32 * b + j] = d
                C[r, 32 * b + j] = F0
                K[r, 32 * b + j] = np.int64(np.int8(q[r, o + _Q8_QS + j]))


@njit(cache=True, parallel=True, error_model="numpy")
def pack_q8_0(q, K):
    for r in prange(q.shape[0]):
        for b in range(K.shape[1] // 32):
            for j in range(32):
                q[r, b * _Q8 + _Q8_QS + j] = np.uint8(K[r, 32 * b + j] & 0xFF)


# ---- Q2_K -------------------------------------------------------------------------------------------------------

_Q2 = block(GGMLType.Q2_K)[1]
_Q2_SC, _Q2_QS, _Q2_D, _Q2_DMIN = fields(GGMLType.Q2_K, "scales", "qs", "d", "dmin")


@njit(cache=True, parallel=True, error_model="numpy")
def grid_q2_k(q, A, C, K):
    for r in prange(q.shape[0]):
        for b in range(A.shape[1] // QK_K):
            o = b * _Q2
            d = load_fp16(q[r], o + _Q2_D)
            dmin = load_fp16(q[r], o + _Q2_DMIN)
            for e in range(QK_K):
                s = np.int64(q[r, o + _Q2_SC + e // 16])
                h, rest = e // 128, e % 128
                A[r, QK_K * b + e] = np.float32(d * np.float32(s & 0xF))
                C[r, QK_K * b + e] = -np.float32(dmin * np.float32(s >> 4))
                K[r, QK_K * b + e] = (np.int64(q[r, o + _Q2_QS + 32 * h + rest % 32]) >> (2 * (rest // 32))) & 3


@njit(cache=True, parallel=True, error_model="numpy")
def pack_q2_k(q, K):
    for r in prange(q.shape[0]):
        for b in range(K.shape[1] // QK_K):
            o, base = b * _Q2, QK_K * b
            for h in range(2):
                for l in range(32):
                    e = base + 128 * h + l
                    q[r, o + _Q2_QS + 32 * h + l] = ((K[r, e] & 3) | ((K[r, e + 32] & 3) << 2)
                                                     | ((K[r, e + 64] & 3) << 4) | ((K[r, e + 96] & 3) << 6))


# ---- Q3_K -------------------------------------------------------------------------------------------------------

_Q3 = block(GGMLType.Q3_K)[1]
_Q3_HM, _Q3_QS, _Q3_SC, _Q3_D = fields(GGMLType.Q3_K, "hmask", "qs", "scales", "d")


@njit(cache=True, inline="always", error_model="numpy")
def _q3_scale(row, o: int, j: int) -> int:
    """6-bit scale j of the Q3_K block at row[o:], minus 32 (the 12 bytes: low nibbles of 0..15, then 2-bit highs)."""
    sp = o + _Q3_SC
    lo = (np.int64(row[sp + j]) & 0xF) if j < 8 else (np.int64(row[sp + j - 8]) >> 4)
    return (lo | ((np.int64(row[sp + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4) - 32


@njit(cache=True, parallel=True, error_model="numpy")
def grid_q3_k(q, A, C, K):
    for r in prange(q.shape[0]):
        for b in range(A.shape[1] // QK_K):
            o = b * _Q3
            d = load_fp16(q[r], o + _Q3_D)
            for e in range(QK_K):
                h, rest = e // 128, e % 128
                k, l = rest // 32, rest % 32
                low = (np.int64(q[r, o + _Q3_QS + 32 * h + l]) >> (2 * k)) & 3
                high = (np.int64(q[r, o + _Q3_HM + l]) >> (4 * h + k)) & 1
                A[r, QK_K * b + e] = np.float32(d * np.float32(_q3_scale(q[r], o, e // 16)))
                C[r, QK_K * b + e] = F0
                K[r, QK_K * b + e] = low + 4 * high - 4


@njit(cache=True, parallel=True, error_model="numpy")
def pack_q3_k(q, K):
    for r in prange(q.shape[0]):
        for b in range(K.shape[1] // QK_K):
            o, base = b * _Q3, QK_K * b
            for l in range(32):
                q[r, o + _Q3_HM + l] = 0
            for h in range(2):
                for l in range(32):
                    packed = 0
                    for k in range(4):
                        u = K[r, base + 128 * h + 32 * k + l] + 4
                        packed |= (u & 3) << (2 * k)
                        q[r, o + _Q3_HM + l] |= ((u >> 2) & 1) << (4 * h + k)
                    q[r, o + _Q3_QS + 32 * h + l] = packed


# ---- Q4_K, Q5_K ----------------------------------------------------------------------------------------------------

_Q4K, _Q5K = block(GGMLType.Q4_K)[1], block(GGMLType.Q5_K)[1]
assert fields(GGMLType.Q4_K, "d", "dmin", "scales", "qs") == (0, 2, 4, 16)
assert fields(GGMLType.Q5_K, "d", "dmin", "scales", "qh", "qs") == (0, 2, 4, 16, 48)


@njit(cache=True, inline="always", error_model="numpy")
def _scale_min_k4(buf, pos: int, j: int):
    """(scale, min) of sub-block j from the 12 packed bytes at buf[pos:] (ggml's get_scale_min_k4)."""
    if j < 4:
        return np.int64(buf[pos + j] & 63), np.int64(buf[pos + j + 4] & 63)
    sc = (np.int64(buf[pos + j + 4]) & 0xF) | ((np.int64(buf[pos + j - 4]) >> 6) << 4)
    m = (np.int64(buf[pos + j + 4]) >> 4) | ((np.int64(buf[pos + j]) >> 6) << 4)
    return sc, m


@njit(cache=True, inline="always", error_model="numpy")
def _k4_grid(q, A, C, K, bb: int, five: bool) -> None:
    ql_at = 48 if five else 16
    for r in prange(q.shape[0]):
        for b in range(A.shape[1] // QK_K):
            o = b * bb
            d = load_fp16(q[r], o)
            dmin = load_fp16(q[r], o + 2)
            for s in range(8):
                sc, m = _scale_min_k4(q[r], o + 4, s)
                a = np.float32(d * np.float32(sc))
                c = -np.float32(dmin * np.float32(m))
                for l in range(32):
                    e = QK_K * b + 32 * s + l
                    v = (np.int64(q[r, o + ql_at + 32 * (s // 2) + l]) >> (4 * (s % 2))) & 0xF
                    if five:
                        v |= ((np.int64(q[r, o + 16 + l]) >> s) & 1) << 4
                    A[r, e] = a
                    C[r, e] = c
                    K[r, e] = v


@njit(cache=True, inline="always", error_model="numpy")
def _k4_pack(q, K, bb: int, five: bool) -> None:
    ql_at = 48 if five else 16
    for r in prange(q.shape[0]):
        for b in range(K.shape[1] // QK_K):
            o, base = b * bb, QK_K * b
            if five:
                for l in range(32):
                    q[r, o + 16 + l] = 0
            for c in range(4):
                for l in range(32):
                    lo = K[r, base + 64 * c + l]
                    hi = K[r, base + 64 * c + 32 + l]
                    q[r, o + ql_at + 32 * c + l] = (lo & 0xF) | ((hi & 0xF) << 4)
                    if five:
                        q[r, o + 16 + l] |= (((lo >> 4) & 1) << (2 * c)) | (((hi >> 4) & 1) << (2 * c + 1))


@njit(cache=True, parallel=True, error_model="numpy")
def grid_q4_k(q, A, C, K):
    _k4_grid(q, A, C, K, _Q4K, False)


@njit(cache=True, parallel=True, error_model="numpy")
def pack_q4_k(q, K):
    _k4_pack(q, K, _Q4K, False)


@njit(cache=True, parallel=True, error_model="numpy")
def grid_q5_k(q, A, C, K):
    _k4_grid(q, A, C, K, _Q5K, True)


@njit(cache=True, parallel=True, error_model="numpy")
def pack_q5_k(q, K):
    _k4_pack(q, K, _Q5K, True)


# ---- Q6_K -------------------------------------------------------------------------------------------------------

_Q6 = block(GGMLType.Q6_K)[1]
_Q6_QL, _Q6_QH, _Q6_SC, _Q6_D = fields(GGMLType.Q6_K, "ql", "qh", "scales", "d")


@njit(cache=True, parallel=True, error_model="numpy")
def grid_q6_k(q, A, C, K):
    for r in prange(q.shape[0]):
        for b in range(A.shape[1] // QK_K):
            o = b * _Q6
            d = load_fp16(q[r], o + _Q6_D)
            for e in range(QK_K):
                h, rest = e // 128, e % 128
                k, l = rest // 32, rest % 32
                lo = (np.int64(q[r, o + _Q6_QL + 64 * h + l + 32 * (k & 1)]) >> (4 * (k >> 1))) & 0xF
                hi = (np.int64(q[r, o + _Q6_QH + 32 * h + l]) >> (2 * k)) & 3
                A[r, QK_K * b + e] = np.float32(d * np.float32(np.int8(q[r, o + _Q6_SC + e // 16])))
                C[r, QK_K * b + e] = F0
                K[r, QK_K * b + e] = (lo | (hi << 4)) - 32


@njit(cache=True, parallel=True, error_model="numpy")
def pack_q6_k(q, K):
    for r in prange(q.shape[0]):
        for b in range(K.shape[1] // QK_K):
            o, base = b * _Q6, QK_K * b
            for h in range(2):
                for l in range(32):
                    u0 = K[r, base + 128 * h + l] + 32
                    u1 = K[r, base + 128 * h + 32 + l] + 32
                    u2 = K[r, base + 128 * h + 64 + l] + 32
                    u3 = K[r, base + 128 * h + 96 + l] + 32
                    q[r, o + _Q6_QL + 64 * h + l] = (u0 & 0xF) | ((u2 & 0xF) << 4)
                    q[r, o + _Q6_QL + 64 * h + 32 + l] = (u1 & 0xF) | ((u3 & 0xF) << 4)
                    q[r, o + _Q6_QH + 32 * h + l] = (((u0 >> 4) & 3) | (((u1 >> 4) & 3) << 2)
                                                     | (((u2 >> 4) & 3) << 4) | (((u3 >> 4) & 3) << 6))


# type → (grid, pack) kernels
KERNELS = {GGMLType.Q8_0: (grid_q8_0, pack_q8_0), GGMLType.Q4_0: (grid_q4_0, pack_q4_0),
           GGMLType.Q4_1: (grid_q4_1, pack_q4_1), GGMLType.Q5_0: (grid_q5_0, pack_q5_0),
           GGMLType.Q5_1: (grid_q5_1, pack_q5_1), GGMLType.Q2_K: (grid_q2_k, pack_q2_k),
           GGMLType.Q3_K: (grid_q3_k, pack_q3_k), GGMLType.Q4_K: (grid_q4_k, pack_q4_k),
           GGMLType.Q5_K: (grid_q5_k, pack_q5_k), GGMLType.Q6_K: (grid_q6_k, pack_q6_k)}


def has_fixed_grid(ggml_type: GGMLType) -> bool:
    return ggml_type in KERNELS


def grid(ggml_type: GGMLType, q: np.ndarray, n_cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, C, K) of packed rows q (rows, bytes): every weight is A*K + C, float32, as the type's dequantizer."""
    A = np.empty((q.shape[0], n_cols), np.float32)
    C = np.empty_like(A)
    K = np.empty((q.shape[0], n_cols), np.int64)
    KERNELS[ggml_type][0](q, A, C, K)
    return A, C, K


def round_and_pack(ggml_type: GGMLType, x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """x (rows, cols) float32 rounded to the grid of the packed rows q (their scales kept), packed into a copy."""
    A, C, K = grid(ggml_type, q, x.shape[1])
    round_to_grid(np.ascontiguousarray(x, np.float32), A, C, K, *K_RANGE[ggml_type])
    out = q.copy()
    KERNELS[ggml_type][1](out, K)
    return out
