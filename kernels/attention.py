"""Attention of a few new tokens over the KV cache, reading K and V in the cache's own type.

For decoding, converting the whole cache to float32 for numpy's matmul on every token and layer cost more than
the attention itself (measured 10 ms of 92 per token on the 0.66B Q4_0 model at ~550 positions). These kernels read F16
bits, Q8_0 codes with fp16 scales, or float32 directly, parallel over KV heads. The math is the matmul path's:
queries already rounded as the cache's type requires, float32 dots, softmax, then the weighted sum of V.

Arrays: q (Hkv, rows, hd) float32 where row = head-in-group * T + t; K, V (Hkv, n_ctx, hd) as stored (uint16 bits
for F16, int8 codes for Q8_0 with uint16 fp16 scales (Hkv, n_ctx, hd / 32), float32); out (Hkv, rows, hd_v).
"""
import numpy as np
from numba import njit, prange

from .common import h2f

F0 = np.float32(0.0)

# How `attend` reads the cache (its `kind` argument). These are KV storage layouts, not ggml type codes: the
# other kernel files' small integers mean something else, so callers use these names.
KV_F16 = 0  # K, V: fp16 bits as uint16
KV_Q8_0 = 1  # K, V: int8 codes; ks, vs: fp16 scale bits (uint16) per 32
KV_F32 = 2  # K, V: float32; ks, vs: unused (pass K, V again)


@njit(cache=True, inline="always")
def _load_f16(src, h, p, dst):
    for d in range(dst.shape[0]):
        dst[d] = h2f(src[h, p, d])


@njit(cache=True, inline="always")
def _load_q8_0(codes, scales, h, p, dst):
    for b in range(dst.shape[0] // 32):
        sc = h2f(scales[h, p, b])
        for j in range(32):
            dst[32 * b + j] = np.float32(codes[h, p, 32 * b + j]) * sc


@njit(cache=True, inline="always")
def _load_f32(src, h, p, dst):
    for d in range(dst.shape[0]):
        dst[d] = src[h, p, d]


@njit(cache=True, inline="always")
def _load(kind, src, scales, h, p, dst):
    if kind == KV_F16:
        _load_f16(src, h, p, dst)
    elif kind == KV_Q8_0:
        _load_q8_0(src, scales, h, p, dst)
    else:
        _load_f32(src, h, p, dst)


@njit(cache=True, inline="always")
def _attend_head(q, h, k_row, v_row, kind, k, ks, v, vs, n, pos0, T, scale, out):
    """One KV head: every row of K and V is converted once, for all the queries that share it."""
    rows = q.shape[1]
    s = np.empty((rows, n), np.float32)
    for p in range(n):
        _load(kind, k, ks, h, p, k_row)
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
        _load(kind, v, vs, h, p, v_row)
        for i in range(rows):
            w = s[i, p]
            for d in range(v_row.shape[0]):
                out[h, i, d] += w * v_row[d]


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def attend(q, kind, k, ks, v, vs, n, pos0, T, scale, out):
    """Attention of q over cache positions 0..n-1; `kind` is KV_F16, KV_Q8_0 or KV_F32 (see above)."""
    for h in prange(q.shape[0]):
        k_row = np.empty(q.shape[2], np.float32)
        v_row = np.empty(out.shape[2], np.float32)
        _attend_head(q, h, k_row, v_row, kind, k, ks, v, vs, n, pos0, T, scale, out)
