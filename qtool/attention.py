"""The KV cache and causal attention over it, for every cache type llama.cpp offers (-ctk/-ctv): F16, F32,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

As llama.cpp: K and V are stored in the cache's type (F16 by default; the quantized types with the codec that
writes them into files, llama.cpp's from_float); queries meet K in K's dot-product type (rounded to F16, or
quantized to Q8_0 / Q8_1 as ggml's vec_dot converts its second operand), so the scores are the integer (or F16)
dots llama.cpp computes, and V is read as float32, as its flash attention does for a quantized V.
- prompt (many tokens), and decode over Q4/Q5 caches: flash attention, in tiles of keys with an online softmax
  (llama.cpp's ggml_flash_attn_ext; Rabe & Staats): each tile of K and V is converted to float32 and numpy's
  matmul computes its scores and outputs, so memory stays O(query tile x key tile) however long the prompt;
- decode (a few tokens) over F16, F32 and Q8_0 caches: kernels/attention.py reads K and V as stored, since
  converting the cache per token and layer cost more than the attention itself.
Heads are grouped (GQA): query head h reads KV head h // (n_head / n_head_kv); scale 1/sqrt(head_dim) unless
the caller gives one. Gemma's extras, as llama.cpp's build_attn: scores soft-capped (cap * tanh(s / cap)) before
the softmax, and a sliding window (a query at p sees keys p - window + 1 .. p: the older ones are masked as the
future is). Windowed or capped attention always takes the tiled path, decode too: the compiled kernels know
neither.
"""
from __future__ import annotations

import numpy as np

from qtool import kernels
from qtool.errors import QtoolError
from qtool.formats.constants import KV_CACHE_TYPES, TYPE_INFO, GGMLType
from qtool.kernels import attention as ka
from qtool.kernels import matmul as mm

KV_TYPES = tuple(KV_CACHE_TYPES)
# flash attention's tiles: queries and keys per step; scores take n_head * Q_TILE * KV_TILE float32s
Q_TILE, KV_TILE = 256, 512


def _value_bytes(kv_type: str) -> float:
    """Bytes per cached value: a block's bytes over its values (Q8_0: 1 + 2/32)."""
    info = TYPE_INFO[KV_CACHE_TYPES[kv_type]]
    return info.type_size / info.block_size


def bytes_per_position(n_layer: int, n_head_kv: int, head_dim: int, head_dim_v: int, kv_type: str) -> int:
    """Bytes of K and V for one cached position over all layers."""
    return int(n_layer * n_head_kv * (head_dim + head_dim_v) * _value_bytes(kv_type))


def check_kv_type(kv_type: str) -> None:
    if kv_type not in KV_TYPES:
        raise QtoolError(f"--kv-type {kv_type!r}: use one of {', '.join(KV_TYPES)}")


class KVCache:
    """K and V of every layer and position, in the cache's type, and attention over them."""

    def __init__(self, n_layer: int, n_head_kv: int, head_dim: int, head_dim_v: int, n_ctx: int,
                 kv_type: str = "f16"):
        check_kv_type(kv_type)
        self.kv_type = kv_type
        self.ggml_type = t = KV_CACHE_TYPES[kv_type]
        self.n_ctx = n_ctx
        self.head_dim, self.head_dim_v = head_dim, head_dim_v
        L, H = n_layer, n_head_kv
        # np.zeros memory is committed only as positions are written
        if t in ka.BLOCK_KINDS:
            bs = TYPE_INFO[t].block_size
            for d in (head_dim, head_dim_v):
                if d % bs:
                    raise QtoolError(f"a {kv_type} KV cache needs head sizes that are multiples of {bs} "
                                     f"(this model: {d})")
            # (layer, kv head, position, bytes of a row of head_dim values in blocks), as ggml stores them
            self.k = np.zeros((L, H, n_ctx, kernels.row_bytes(t, head_dim)), np.uint8)
            self.v = np.zeros((L, H, n_ctx, kernels.row_bytes(t, head_dim_v)), np.uint8)
            self._kind = ka.BLOCK_KINDS[t]
        else:
            dt = np.float16 if t == GGMLType.F16 else np.float32
            self.k = np.zeros((L, H, n_ctx, head_dim), dt)  # (layer, kv head, position, head_dim)
            self.v = np.zeros((L, H, n_ctx, head_dim_v), dt)  # (layer, kv head, position, head_dim_v)
            self._kind = ka.KV_F16 if t == GGMLType.F16 else ka.KV_F32
        # the queries' conversion to K's dot-product type (ggml's vec_dot_type of K)
        self._q_kind = mm.VEC_DOT_TYPE[t]
        self.bytes_per_token = bytes_per_position(n_layer, n_head_kv, head_dim, head_dim_v, kv_type)

    def nbytes(self, n_tokens: int) -> int:
        return self.bytes_per_token * n_tokens

    def store(self, layer: int, pos0: int, k: np.ndarray, v: np.ndarray) -> None:
        """k (T, Hkv, head_dim), v (T, Hkv, head_dim_v) float32 written at positions pos0..pos0+T-1."""
        T = k.shape[0]
        for src, dst in ((k, self.k), (v, self.v)):
            rows = src.transpose(1, 0, 2)  # (Hkv, T, d)
            if self.k.dtype == np.uint8:  # blocks, by the codec that writes them into files
                H, _, d = rows.shape
                rows = kernels.quantize(self.ggml_type, rows.reshape(H * T, d)).reshape(H, T, -1)
            dst[layer, :, pos0:pos0 + T] = rows

    def load(self, layer: int, p0: int, p1: int) -> tuple[np.ndarray, np.ndarray]:
        """K, V of positions p0..p1-1 as float32 (Hkv, p1 - p0, head_dim)."""
        out = []
        for src, d in ((self.k, self.head_dim), (self.v, self.head_dim_v)):
            rows = src[layer, :, p0:p1]
            if src.dtype == np.uint8:
                H, n, _ = rows.shape
                rows = kernels.dequantize(self.ggml_type, rows.reshape(H * n, -1), d).reshape(H, n, d)
            out.append(rows.astype(np.float32, copy=False))
        return out[0], out[1]

    def attend(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int, scale: float | None = None,
               softcap: float = 0.0, window: int = 0) -> np.ndarray:
        """Store k, v of T new tokens at pos0, then causal attention of their queries q (T, n_head, head_dim) over
        positions 0..pos0+T-1 (the `window` newest of them, when given): out (T, n_head * head_dim_v). Scores are
        scaled by `scale` (default 1/sqrt(head_dim)), then soft-capped when `softcap` is given."""
        T, n_head, hd = q.shape
        n_head_kv = k.shape[1]
        self.store(layer, pos0, k, v)
        n = pos0 + T
        g = n_head // n_head_kv
        # queries of one KV head's group side by side: row = head-in-group * T + t
        qh = q.transpose(1, 0, 2).reshape(n_head_kv, g * T, hd)
        # queries meet K in K's dot-product type, as ggml's vec_dot converts its second operand
        if self._q_kind != "f32":
            qh = mm.Act(self._q_kind, qh.reshape(-1, hd)).dequantized().reshape(qh.shape)
        scale = np.float32(1.0 / np.sqrt(np.float32(hd)) if scale is None else scale)
        # the same switch as the weights' products: few tokens, no float32 copy
        if T < mm.BLAS_MIN_TOKENS and not softcap and not window:
            o = self._attend_stored(layer, np.ascontiguousarray(qh, dtype=np.float32), n, pos0, T, scale)
        else:
            o = self._attend_tiled(layer, qh.reshape(n_head_kv, g, T, hd), pos0, scale, softcap, window)
        return o.reshape(n_head, T, self.head_dim_v).transpose(1, 0, 2).reshape(T, n_head * self.head_dim_v)

    def _attend_stored(self, layer: int, qh: np.ndarray, n: int, pos0: int, T: int,
                       scale: np.float32) -> np.ndarray:
        """Decode: the compiled kernel reads K and V as stored. qh (Hkv, g*T, hd) → (Hkv, g*T, hd_v)."""
        o = np.empty((qh.shape[0], qh.shape[1], self.head_dim_v), np.float32)
        k, v = self.k[layer], self.v[layer]
        if k.dtype == np.uint8:
            ka.attend_blocks(qh, self._kind, k, v, n, pos0, T, scale, o)
        else:
            ka.attend(qh, self._kind, k.view(np.uint16) if k.dtype == np.float16 else k,
                      v.view(np.uint16) if v.dtype == np.float16 else v, n, pos0, T, scale, o)
        return o

    def _attend_tiled(self, layer: int, q: np.ndarray, pos0: int, scale: np.float32, softcap: float = 0.0,
                      window: int = 0) -> np.ndarray:
        """Prompt: flash attention. q (Hkv, g, T, hd) → (Hkv, g*T, hd_v). For each tile of queries, the keys
        they can see go by in tiles converted to float32; a running maximum m, sum l and output acc per query
        take each tile's scores exp(s - m) (rescaling what came before when m grows), so no score matrix
        longer than a tile exists."""
        H, g, T, hd = q.shape
        out = np.empty((H, g, T, self.head_dim_v), np.float32)
        for t0 in range(0, T, Q_TILE):
            t1 = min(T, t0 + Q_TILE)
            qt = q[:, :, t0:t1].reshape(H, g * (t1 - t0), hd)
            q_pos = np.tile(pos0 + np.arange(t0, t1), g)  # each query row's position
            m = np.full((H, qt.shape[1], 1), -np.inf, np.float32)
            l = np.zeros((H, qt.shape[1], 1), np.float32)
            acc = np.zeros((H, qt.shape[1], self.head_dim_v), np.float32)
            # the first query of the tile sees back to pos0 + t0 - window + 1; the last up to pos0 + t1 - 1
            first = max(0, pos0 + t0 - window + 1) if window else 0
            for k0 in range(first, pos0 + t1, KV_TILE):
                k1 = min(pos0 + t1, k0 + KV_TILE)
                K, V = self.load(layer, k0, k1)
                s = np.matmul(qt, np.ascontiguousarray(K.transpose(0, 2, 1)))  # (Hkv, g*tile, keys)
                s *= scale
                if softcap:  # as ggml: scale by 1/cap, tanh, scale by cap
                    s *= np.float32(1.0 / np.float32(softcap))
                    np.tanh(s, out=s)
                    s *= np.float32(softcap)
                keys = np.arange(k0, k1)[None, :]
                # added as a bias over all heads: a boolean-indexed store costs 40x the add
                if k1 - 1 > pos0 + t0:  # causal: the query at position p sees keys up to p
                    s += np.where(keys > q_pos[:, None], np.float32(-np.inf), np.float32(0))
                if window and k0 <= pos0 + t1 - 1 - window:  # and, in a window, none older than p - window + 1
                    s += np.where(keys <= q_pos[:, None] - window, np.float32(-np.inf), np.float32(0))
                m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
                # a query whose keys in this tile are all masked (windows) has m_new -inf until its first key
                m_safe = np.where(m_new == -np.inf, np.float32(0), m_new)
                s -= m_safe
                np.exp(s, out=s)
                rescale = np.exp(m - m_safe)
                l = l * rescale + s.sum(axis=-1, keepdims=True)
                acc *= rescale
                acc += np.matmul(s, V)
                m = m_new
            out[:, :, t0:t1] = (acc / l).reshape(H, g, t1 - t0, self.head_dim_v)
        return out.reshape(H, g * T, self.head_dim_v)
