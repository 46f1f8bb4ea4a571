"""Attention of a few new tokens over the KV cache, reading K and V in the cache's own type.

For decoding, converting the whole cache to float32 for numpy's matmul on every token and layer cost more than
the attention itself (measured 10 ms of 92 per token on the 0.66B Q4_0 model at ~550 positions). These kernels read F16
bits, float32, or the blocks of a quantized cache (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, as ggml stores them) directly,
parallel over KV heads. The math is the prompt path's: queries already rounded as the cache's type requires,
float32 dots, softmax, then the weighted sum of V.

Arrays: q (Hkv, rows, hd) float32 where row = head-in-group * T + t; K, V (Hkv, n_ctx, hd) as stored (uint16 bits
for F16, float32) or (Hkv, n_ctx, row bytes) uint8 blocks for the quantized types; out (Hkv, rows, hd_v).
"""
import numpy as np
from numba import njit, prange

from qtool.formats.constants import GGMLType as G

from .common import h2f
from .traits import block, fields

F0 = np.float32(0.0)

# How the kernels read the cache (their `kind` argument). These are KV storage layouts, not ggml type codes: the
# other kernel files' small integers mean something else, so callers use these names.
KV_F16 = 0  # fp16 bits as uint16 (attend)
KV_F32 = 1  # float32 (attend)
KV_Q8_0 = 2  # the quantized types' blocks, uint8 (attend_blocks)
KV_Q4_0 = 3
KV_Q4_1 = 4
KV_Q5_0 = 5
KV_Q5_1 = 6
BLOCK_KINDS = {G.Q8_0: KV_Q8_0, G.Q4_0: KV_Q4_0, G.Q4_1: KV_Q4_1, G.Q5_0: KV_Q5_0, G.Q5_1: KV_Q5_1}

QK = block(G.Q8_0)[0]  # 32 values per block, every type here
Q8_0_BYTES, Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES = (block(t)[1] for t in BLOCK_KINDS)
Q8_0_D, Q8_0_QS = fields(G.Q8_0, "d", "qs")
Q4_0_D, Q4_0_QS = fields(G.Q4_0, "d", "qs")
Q4_1_D, Q4_1_M, Q4_1_QS = fields(G.Q4_1, "d", "m", "qs")
Q5_0_D, Q5_0_QH, Q5_0_QS = fields(G.Q5_0, "d", "qh", "qs")
Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS = fields(G.Q5_1, "d", "m", "qh", "qs")


@njit(cache=True, inline="always")
def _f16_at(src, h, p, o) -> np.float32:
    return h2f(np.uint16(src[h, p, o]) | (np.uint16(src[h, p, o + 1]) << np.uint16(8)))


@njit(cache=True, inline="always")
def _u32_at(src, h, p, o) -> np.uint32:
    return (np.uint32(src[h, p, o]) | (np.uint32(src[h, p, o + 1]) << np.uint32(8))
            | (np.uint32(src[h, p, o + 2]) << np.uint32(16)) | (np.uint32(src[h, p, o + 3]) << np.uint32(24)))


@njit(cache=True, inline="always")
def _load_float(kind, src, h, p, dst):
    """Row p of head h of an F16 or F32 cache as float32."""
    for d in range(dst.shape[0]):
        if kind == KV_F16:
            dst[d] = h2f(src[h, p, d])
        else:
            dst[d] = src[h, p, d]


@njit(cache=True, inline="always")
def _load_blocks(kind, src, h, p, dst):
    """Row p of head h of a quantized cache as float32: each block's codes times its scale (plus its minimum)."""
    half = QK // 2
    for b in range(dst.shape[0] // QK):
        o = QK * b
        if kind == KV_Q8_0:
            s = b * Q8_0_BYTES
            d = _f16_at(src, h, p, s + Q8_0_D)
            for j in range(QK):
                dst[o + j] = np.float32(np.int32(np.int8(src[h, p, s + Q8_0_QS + j]))) * d
        elif kind == KV_Q4_0:
            s = b * Q4_0_BYTES
            d = _f16_at(src, h, p, s + Q4_0_D)
            for j in range(half):
                c = np.int32(src[h, p, s + Q4_0_QS + j])
                dst[o + j] = np.float32((c & 15) - 8) * d
                dst[o + half + j] = np.float32((c >> 4) - 8) * d
        elif kind == KV_Q4_1:
            s = b * Q4_1_BYTES
            d, m = _f16_at(src, h, p, s + Q4_1_D), _f16_at(src, h, p, s + Q4_1_M)
            for j in range(half):
                c = np.int32(src[h, p, s + Q4_1_QS + j])
                dst[o + j] = np.float32(c & 15) * d + m
                dst[o + half + j] = np.float32(c >> 4) * d + m
        elif kind == KV_Q5_0:
            s = b * Q5_0_BYTES
            d = _f16_at(src, h, p, s + Q5_0_D)
            qh = _u32_at(src, h, p, s + Q5_0_QH)
            for j in range(half):
                c = np.int32(src[h, p, s + Q5_0_QS + j])
                lo = (c & 15) | np.int32(((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4))
                hi = (c >> 4) | np.int32(((qh >> np.uint32(j + half)) & np.uint32(1)) << np.uint32(4))
                dst[o + j] = np.float32(lo - 16) * d
                dst[o + half + j] = np.float32(hi - 16) * d
        else:  # KV_Q5_1
            s = b * Q5_1_BYTES
            d, m = _f16_at(src, h, p, s + Q5_1_D), _f16_at(src, h, p, s + Q5_1_M)
            qh = _u32_at(src, h, p, s + Q5_1_QH)
            for j in range(half):
                c = np.int32(src[h, p, s + Q5_1_QS + j])
                lo = (c & 15) | np.int32(((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4))
                hi = (c >> 4) | np.int32(((qh >> np.uint32(j + half)) & np.uint32(1)) << np.uint32(4))
                dst[o + j] = np.float32(lo) * d + m
                dst[o + half + j] = np.float32(hi) * d + m


@njit(cache=True, inline="always")
def _attend_head(load, q, h, k_row, v_row, kind, k, v, n, pos0, T, scale, out):
    """One KV head: every row of K and V is converted once (by `load`), for all the queries that share it."""
    rows = q.shape[1]
    s = np.empty((rows, n), np.float32)
    for p in range(n):
        load(kind, k, h, p, k_row)
        for i in range(rows):
            acc = F0
            for d in range(k_row.shape[0]):
                acc += q[h, i, d] * k_row[d]
            s[i, p] = acc * scale
    for i in range(rows):  # causal: the query at position pos0 + t sees keys up to itself
        n_valid = min(n, pos0 + i % T + 1)
        m = s[i, 0]
        for p in range(1, n_valid):
            m = max(m, s[i, p])
        total = F0
        for p in range(n_valid):
            e = np.float32(np.exp(s[i, p] - m))
            s[i, p] = e
            total += e
        inv = np.float32(1.0) / total
        for p in range(n):
            s[i, p] = s[i, p] * inv if p < n_valid else F0
        for d in range(v_row.shape[0]):
            out[h, i, d] = F0
    for p in range(n):
        load(kind, v, h, p, v_row)
        for i in range(rows):
            w = s[i, p]
            for d in range(v_row.shape[0]):
                out[h, i, d] += w * v_row[d]


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def attend(q, kind, k, v, n, pos0, T, scale, out):
    """Attention of q over cache positions 0..n-1 of an F16 (uint16 bits) or F32 cache; kind KV_F16 or KV_F32."""
    for h in prange(q.shape[0]):
        k_row = np.empty(q.shape[2], np.float32)
        v_row = np.empty(out.shape[2], np.float32)
        _attend_head(_load_float, q, h, k_row, v_row, kind, k, v, n, pos0, T, scale, out)


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def attend_blocks(q, kind, k, v, n, pos0, T, scale, out):
    """The same over a quantized cache's uint8 blocks; kind one of BLOCK_KINDS' values."""
    for h in prange(q.shape[0]):
        k_row = np.empty(q.shape[2], np.float32)
        v_row = np.empty(out.shape[2], np.float32)
        _attend_head(_load_blocks, q, h, k_row, v_row, kind, k, v, n, pos0, T, scale, out)
