"""The KV cache and causal attention over it, for both paths and every cache type (F16, Q8_0, F32).

As llama.cpp: K and V are stored in the cache's type (F16 by default); queries meet K in K's type, rounded to
F16 or quantized to Q8_0 as ggml's vec_dot does, so the scores are the integer (or F16) dots llama.cpp computes.
- prompt (many tokens): the cache is converted to float32 and numpy's matmul computes scores and outputs;
- decode (a few tokens): kernels/attention.py reads K and V as stored, since converting the whole cache per token
  and layer cost more than the attention itself.
Heads are grouped (GQA): query head h reads KV head h // (n_head / n_head_kv); scale 1/sqrt(head_dim).
"""
from __future__ import annotations

import numpy as np

from qtool.errors import QtoolError
from qtool.kernels import attention as ka
from qtool.kernels import matmul as mm

KV_TYPES = ("f16", "q8_0", "f32")
QK8_0 = 32  # values per Q8_0 block (one fp16 scale each)


def _quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 along the last axis, as ggml's quantize_row_q8_0 (AVX rounding: 127/amax, half to even): int8 codes
    and fp16 scales per 32."""
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    codes = np.empty(rows.shape, np.float32)
    scales = np.empty((rows.shape[0], rows.shape[1] // QK8_0), np.float32)
    sums = np.empty_like(scales)  # Q8_1's extra, not kept
    mm.quantize_act_q8_0(rows, codes, scales, sums)
    # codes are integers in [-127, 127] and scales already rounded to fp16: both casts are exact
    return (codes.astype(np.int8).reshape(x.shape),
            scales.astype(np.float16).reshape(*x.shape[:-1], x.shape[-1] // QK8_0))


# bytes per cached value: the element, plus for Q8_0 its share of the fp16 scale of each 32
VALUE_BYTES = {"f16": 2.0, "f32": 4.0, "q8_0": 1.0 + 2.0 / QK8_0}


def bytes_per_position(n_layer: int, n_head_kv: int, head_dim: int, head_dim_v: int, kv_type: str) -> int:
    """Bytes of K and V for one cached position over all layers."""
    return int(n_layer * n_head_kv * (head_dim + head_dim_v) * VALUE_BYTES[kv_type])


def check_kv_type(kv_type: str) -> None:
    if kv_type not in KV_TYPES:
        raise QtoolError(f"--kv-type {kv_type!r}: use one of {', '.join(KV_TYPES)}")


class KVCache:
    """K and V of every layer and position, in the cache's type, and attention over them."""

    def __init__(self, n_layer: int, n_head_kv: int, head_dim: int, head_dim_v: int, n_ctx: int,
                 kv_type: str = "f16"):
        check_kv_type(kv_type)
        self.kv_type = kv_type
        self.n_ctx = n_ctx
        self.head_dim, self.head_dim_v = head_dim, head_dim_v
        L, H = n_layer, n_head_kv
        # np.zeros memory is committed only as positions are written
        if kv_type == "q8_0":
            for d in (head_dim, head_dim_v):
                if d % QK8_0:
                    raise QtoolError(f"a q8_0 KV cache needs head sizes that are multiples of 32 (this model: {d})")
            self.k = np.zeros((L, H, n_ctx, head_dim), np.int8)  # (layer, kv head, position, head_dim) codes
            self.v = np.zeros((L, H, n_ctx, head_dim_v), np.int8)
            self.ks = np.zeros((L, H, n_ctx, head_dim // QK8_0), np.float16)  # one scale per 32 codes
            self.vs = np.zeros((L, H, n_ctx, head_dim_v // QK8_0), np.float16)
        else:
            dt = np.float16 if kv_type == "f16" else np.float32
            self.k = np.zeros((L, H, n_ctx, head_dim), dt)  # (layer, kv head, position, head_dim)
            self.v = np.zeros((L, H, n_ctx, head_dim_v), dt)  # (layer, kv head, position, head_dim_v)
            self.ks = self.vs = None
        self.bytes_per_token = bytes_per_position(n_layer, n_head_kv, head_dim, head_dim_v, kv_type)
        # what the decode kernel reads: its layout code and the arrays as it takes them (fp16 as uint16 bits)
        if kv_type == "q8_0":
            self._kernel = (ka.KV_Q8_0, self.k, self.ks.view(np.uint16), self.v, self.vs.view(np.uint16))
        elif kv_type == "f16":
            k, v = self.k.view(np.uint16), self.v.view(np.uint16)
            self._kernel = (ka.KV_F16, k, k, v, v)
        else:
            self._kernel = (ka.KV_F32, self.k, self.k, self.v, self.v)

    def nbytes(self, n_tokens: int) -> int:
        return self.bytes_per_token * n_tokens

    def store(self, layer: int, pos0: int, k: np.ndarray, v: np.ndarray) -> None:
        """k (T, Hkv, head_dim), v (T, Hkv, head_dim_v) float32 written at positions pos0..pos0+T-1."""
        T = k.shape[0]
        if self.kv_type == "q8_0":
            for src, codes, scales in ((k, self.k, self.ks), (v, self.v, self.vs)):
                c, s = _quantize_q8_0(src)
                codes[layer, :, pos0:pos0 + T] = c.transpose(1, 0, 2)
                scales[layer, :, pos0:pos0 + T] = s.transpose(1, 0, 2)
        else:
            self.k[layer, :, pos0:pos0 + T] = k.transpose(1, 0, 2)
            self.v[layer, :, pos0:pos0 + T] = v.transpose(1, 0, 2)

    def load(self, layer: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """K, V of positions 0..n-1 as float32 (Hkv, n, head_dim)."""
        if self.kv_type == "q8_0":
            out = []
            for codes, scales in ((self.k, self.ks), (self.v, self.vs)):
                c = codes[layer, :, :n].astype(np.float32)
                H, _, d = c.shape
                s = scales[layer, :, :n].astype(np.float32)
                out.append((c.reshape(H, n, d // QK8_0, QK8_0) * s[..., None]).reshape(H, n, d))
            return out[0], out[1]
        return self.k[layer, :, :n].astype(np.float32), self.v[layer, :, :n].astype(np.float32)

    def attend(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int) -> np.ndarray:
        """Store k, v of T new tokens at pos0, then causal attention of their queries q (T, n_head, head_dim) over
        positions 0..pos0+T-1: out (T, n_head * head_dim_v)."""
        T, n_head, hd = q.shape
        n_head_kv = k.shape[1]
        self.store(layer, pos0, k, v)
        n = pos0 + T
        g = n_head // n_head_kv
        # queries of one KV head's group side by side: row = head-in-group * T + t
        qh = q.transpose(1, 0, 2).reshape(n_head_kv, g * T, hd)
        # queries meet K in K's type, as ggml's vec_dot converts its second operand
        if self.kv_type == "f16":
            qh = mm.round_f16(qh)
        elif self.kv_type == "q8_0":
            qh = mm.Act("q8_0", qh.reshape(-1, hd)).dequantized().reshape(qh.shape)
        scale = np.float32(1.0 / np.sqrt(np.float32(hd)))
        if T < mm.BLAS_MIN_TOKENS:  # the same switch as the weights' products: few tokens, no float32 copy
            o = self._attend_stored(layer, np.ascontiguousarray(qh, dtype=np.float32), n, pos0, T, scale)
        else:
            o = self._attend_float32(layer, qh, n, pos0, T, scale)
        return o.reshape(n_head, T, self.head_dim_v).transpose(1, 0, 2).reshape(T, n_head * self.head_dim_v)

    def _attend_stored(self, layer: int, qh: np.ndarray, n: int, pos0: int, T: int,
                       scale: np.float32) -> np.ndarray:
        """Decode: the compiled kernel reads K and V as stored. qh (Hkv, g*T, hd) → (Hkv, g*T, hd_v)."""
        kind, k, ks, v, vs = self._kernel
        o = np.empty((qh.shape[0], qh.shape[1], self.head_dim_v), np.float32)
        ka.attend(qh, kind, k[layer], ks[layer], v[layer], vs[layer], n, pos0, T, scale, o)
        return o

    def _attend_float32(self, layer: int, qh: np.ndarray, n: int, pos0: int, T: int,
                        scale: np.float32) -> np.ndarray:
        """Prompt: the cache converted to float32 once, scores and outputs by BLAS. qh (Hkv, g*T, hd)."""
        H, gT, _ = qh.shape
        K, V = self.load(layer, n)  # (Hkv, n, hd)
        scores = np.matmul(qh, K.transpose(0, 2, 1))  # (Hkv, g*T, n)
        scores *= scale
        scores = scores.reshape(H, gT // T, T, n)
        if T > 1 or pos0 + T < n:  # causal: the query at pos0 + t sees keys up to itself
            mask = np.arange(n)[None, :] > (pos0 + np.arange(T))[:, None]
            scores[:, :, mask] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        return np.matmul(scores.reshape(H, gT, n), V)  # (Hkv, g*T, hd_v)
