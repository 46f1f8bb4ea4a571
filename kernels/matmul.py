"""Matrix products against weights kept in their stored (quantized) form: y = x @ W.T, W read block by block.

The math is llama.cpp's CPU math. Like ggml, a product first converts the activations to the weight type's
"vec_dot_type": F16 weights meet activations rounded to F16, BF16 weights activations rounded to BF16, the
32-weight types Q4_0/Q5_0/Q8_0 activations quantized to Q8_0 (Q4_1/Q5_1 to Q8_1) and the K-quants activations
quantized to Q8_K (float32 scale per 256, int8 codes, sums of 16). Then, per block, the integer dot of the codes is
scaled by both scales. The per-block integer sums are computed in float32, which is exact (at most 32 products of
|q| <= 255 * 127, far below 2^24), so any summation order inside a block gives llama.cpp's integers; only the
float sums across blocks differ from llama.cpp's in rounding order.

Two paths, same math:
- fused kernels (decode, a few tokens; matvec.py): one numba kernel per type, parallel over weight rows, one
  SIMD lane per block of a row; quantized weights are repacked once, when loaded, into the "planes" those
  kernels read (the file's bytes reordered, see matvec.py).
- blocked (prompt processing, many tokens): tiles of rows are dequantized into a small float32 buffer and handed
  to BLAS together with the (quantized-then-dequantized) activations; W = d*q and x = dx*qx are exact in
  float32 products' rounding, so this is the same sum up to float rounding. Never more than one tile of W is
  materialized.

`linear(w, x)` picks the path. Weights are `Weight` objects: the ggml type, the stored bytes, the shape.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from qtool.formats.constants import QK_K, TYPE_INFO, GGMLType

from .common import fp16_bits, fp16_value, load_fp16
from . import matvec as mv
from .matvec import bf2f, h2f

F0 = np.float32(0.0)
BLAS_MIN_TOKENS = 8  # from this many tokens on, dequantize tiles and use BLAS
TILE_BYTES = 4 << 20  # float32 bytes of one dequantized tile
SMALL_WORK = 1 << 20  # multiply-adds below which a fused product runs on one thread


# ---- activation conversion (ggml's quantize_row_q8_0 / q8_1 / q8_K) --------------------------------------------
@njit(parallel=True, cache=True)
def quantize_act_q8_0(x, xq, xd, xs):
    """x float32 (T, K) → codes xq float32 (T, K) (int8 values), scales xd (T, K/32) as fp16-rounded float32 and,
    for Q8_1, xs = fp16(d * sum(codes)). Like ggml's AVX code: id = 127/amax, round half to even."""
    T, K = x.shape
    nb = K // 32
    for t in prange(T):
        for b in range(nb):
            amax = F0
            for j in range(32):
                a = abs(x[t, b * 32 + j])
                if a > amax:
                    amax = a
            d = np.float32(amax / np.float32(127.0))
            inv = np.float32(np.float32(127.0) / amax) if amax != F0 else F0
            s = 0
            for j in range(32):
                q = np.rint(np.float32(x[t, b * 32 + j] * inv))
                xq[t, b * 32 + j] = q
                s += int(q)
            xd[t, b] = fp16_value(fp16_bits(d))
            xs[t, b] = fp16_value(fp16_bits(np.float32(d * np.float32(s))))


@njit(cache=True, inline="always")
def _nearest_int(v):
    return np.float32(np.float32(v + np.float32(12582912.0)) - np.float32(12582912.0))


@njit(parallel=True, cache=True)
def quantize_act_q8_k(x, xq, xd, xb):
    """quantize_row_q8_K_ref: per 256, iscale = -127/max (max: the value of largest magnitude), q = min(127,
    nearest_int(iscale*x)), d = 1/iscale (float32); xb: sums of each 16 codes."""
    T, K = x.shape
    nb = K // QK_K
    for t in prange(T):
        for b in range(nb):
            o = b * QK_K
            amax = F0
            mx = F0
            for j in range(QK_K):
                a = abs(x[t, o + j])
                if a > amax:
                    amax = a
                    mx = x[t, o + j]
            if amax == F0:
                xd[t, b] = F0
                for j in range(QK_K):
                    xq[t, o + j] = F0
                for j in range(16):
                    xb[t, b * 16 + j] = F0
                continue
            iscale = np.float32(np.float32(-127.0) / mx)
            for j in range(QK_K):
                v = _nearest_int(np.float32(iscale * x[t, o + j]))
                xq[t, o + j] = min(np.float32(127.0), v)
            for j in range(16):
                s = F0
                for l in range(16):
                    s += xq[t, o + 16 * j + l]
                xb[t, b * 16 + j] = s
            xd[t, b] = np.float32(np.float32(1.0) / iscale)


def round_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 → float32, round to nearest even (ggml's GGML_FP32_TO_BF16; NaN kept quiet)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = np.where(nan, (u >> 16 | 64) << 16, r)
    return r.astype(np.uint32).view(np.float32).reshape(x.shape)


class Act:
    """Activations converted to a weight type's vec_dot_type (all arrays float32)."""
    __slots__ = ("kind", "x", "q", "d", "s", "_deq", "_planes")

    def __init__(self, kind: str, x: np.ndarray):
        self.kind = kind
        self._deq = None
        self._planes = None
        x = np.ascontiguousarray(x, dtype=np.float32)
        T, K = x.shape
        self.q = self.d = self.s = None
        if kind == "f32":
            self.x = x
        elif kind == "f16":
            self.x = round_f16(x)
        elif kind == "bf16":
            self.x = round_bf16(x)
        elif kind in ("q8_0", "q8_1"):
            self.x = x
            self.q = np.empty((T, K), np.float32)
            self.d = np.empty((T, K // 32), np.float32)
            self.s = np.empty((T, K // 32), np.float32)
            quantize_act_q8_0(x, self.q, self.d, self.s)
        elif kind == "q8_k":
            self.x = x
            self.q = np.empty((T, K), np.float32)
            self.d = np.empty((T, K // QK_K), np.float32)
            self.s = np.empty((T, K // 16), np.float32)
            quantize_act_q8_k(x, self.q, self.d, self.s)
        else:
            raise ValueError(kind)

    def dequantized(self) -> np.ndarray:
        """The activations as the integer dot sees them, as float32 (for the BLAS path)."""
        if self._deq is None:
            if self.q is None:
                self._deq = self.x
            else:
                T, K = self.q.shape
                bs = 32 if self.kind != "q8_k" else QK_K
                self._deq = (self.q.reshape(T, K // bs, bs) * self.d[:, :, None]).reshape(T, K)
        return self._deq

    def planes(self) -> tuple[np.ndarray, ...]:
        """The quantized activations laid out as matvec.py's kernels read them, blocks last and padded with
        zeros: int16 codes (T, per block, lanes), scales (T, lanes) and, for Q8_0, the sums of each block's codes;
        for Q8_1, fp16(d * sum); for Q8_K, the sums of each 16 codes (T, 16, lanes)."""
        if self._planes is None:
            T, K = self.q.shape
            bs = QK_K if self.kind == "q8_k" else 32
            nb = K // bs
            lanes = mv.n_lanes(nb)

            def pad(a, inner, dtype=np.float32):
                out = np.zeros((T, inner, lanes), dtype)
                out[:, :, :nb] = a.reshape(T, nb, inner).transpose(0, 2, 1)
                return out if inner > 1 else out.reshape(T, lanes)

            codes = pad(self.q, bs, np.int16)
            if self.kind == "q8_0":
                extra = pad(self.q.reshape(T, nb, bs).sum(axis=2, dtype=np.float32), 1)
            elif self.kind == "q8_1":
                extra = pad(self.s, 1)
            else:
                extra = pad(self.s, 16)
            self._planes = (codes, pad(self.d, 1), extra)
        return self._planes


VEC_DOT_TYPE = {
    GGMLType.F32: "f32", GGMLType.F16: "f16", GGMLType.BF16: "bf16",
    GGMLType.Q8_0: "q8_0", GGMLType.Q4_0: "q8_0", GGMLType.Q5_0: "q8_0",
    GGMLType.Q4_1: "q8_1", GGMLType.Q5_1: "q8_1",
    GGMLType.Q2_K: "q8_k", GGMLType.Q3_K: "q8_k", GGMLType.Q4_K: "q8_k", GGMLType.Q5_K: "q8_k",
    GGMLType.Q6_K: "q8_k",
}
SUPPORTED = frozenset(VEC_DOT_TYPE)


@njit(cache=True, inline="always")
def _q3_scale(wr, p: int, j: int) -> np.float32:
    """6-bit scale j (0..15) of a block_q3_K at p, minus 32 (scales[12] at p+96)."""
    s = p + 96
    if j < 4:
        v = (wr[s + j] & 15) | (((wr[s + 8 + j]) & 3) << 4)
    elif j < 8:
        v = (wr[s + j] & 15) | (((wr[s + 4 + j] >> 2) & 3) << 4)
    elif j < 12:
        v = (wr[s + j - 8] >> 4) | (((wr[s + j] >> 4) & 3) << 4)
    else:
        v = (wr[s + j - 8] >> 4) | (((wr[s + j - 4] >> 6) & 3) << 4)
    return np.float32(np.int32(v) - 32)



# ---- row dequantization (for the blocked path and embeddings) ---------------------------------------------------
@njit(parallel=True, cache=True)
def deq_q3_k(q, out):
    """dequantize_row_q3_K over rows."""
    n_rows, n_cols = out.shape
    for r in prange(n_rows):
        wr = q[r]
        for b in range(n_cols // QK_K):
            p = b * 110
            d = load_fp16(wr, p + 108)
            for n in range(2):
                for j in range(4):
                    m = np.uint8(1 << (4 * n + j))
                    for half in range(2):
                        dl = np.float32(d * _q3_scale(wr, p, 8 * n + 2 * j + half))
                        qb = p + 32 + 32 * n + 16 * half
                        hb = p + 16 * half
                        ob = b * QK_K + 128 * n + 32 * j + 16 * half
                        for l in range(16):
                            v = np.int32((wr[qb + l] >> (2 * j)) & 3)
                            if (wr[hb + l] & m) == 0:
                                v -= 4
                            out[r, ob + l] = dl * np.float32(v)


@njit(parallel=True, cache=True)
def deq_q6_k(q, out):
    """dequantize_row_q6_K over rows."""
    n_rows, n_cols = out.shape
    for r in prange(n_rows):
        wr = q[r]
        for b in range(n_cols // QK_K):
            p = b * 210
            d = load_fp16(wr, p + 208)
            for n in range(2):
                ql = p + 64 * n
                qh = p + 128 + 32 * n
                sp = p + 192 + 8 * n
                ob = b * QK_K + 128 * n
                for l in range(32):
                    i = l // 16
                    a = wr[ql + l]
                    c = wr[ql + 32 + l]
                    h = wr[qh + l]
                    out[r, ob + l] = np.float32(d * np.float32(np.int8(wr[sp + i]))) * \
                        np.float32(np.int32((a & 15) | ((h & 3) << 4)) - 32)
                    out[r, ob + 32 + l] = np.float32(d * np.float32(np.int8(wr[sp + i + 2]))) * \
                        np.float32(np.int32((c & 15) | (((h >> 2) & 3) << 4)) - 32)
                    out[r, ob + 64 + l] = np.float32(d * np.float32(np.int8(wr[sp + i + 4]))) * \
                        np.float32(np.int32((a >> 4) | (((h >> 4) & 3) << 4)) - 32)
                    out[r, ob + 96 + l] = np.float32(d * np.float32(np.int8(wr[sp + i + 6]))) * \
                        np.float32(np.int32((c >> 4) | (((h >> 6) & 3) << 4)) - 32)


@njit(parallel=True, cache=True)
def deq_f16(q, out):
    for r in prange(out.shape[0]):
        for i in range(out.shape[1]):
            out[r, i] = h2f(q[r, i])


@njit(parallel=True, cache=True)
def deq_bf16(q, out):
    for r in prange(out.shape[0]):
        for i in range(out.shape[1]):
            out[r, i] = bf2f(q[r, i])


_LOCAL_DEQ = {GGMLType.Q3_K: deq_q3_k, GGMLType.Q6_K: deq_q6_k}


def dequantize_rows(ggml_type: GGMLType, data: np.ndarray, n_cols: int, out: np.ndarray | None = None) -> np.ndarray:
    """Stored rows (uint8 packed, or uint16 bits for F16/BF16, or float32) → float32 (rows, n_cols)."""
    rows = data.shape[0]
    if out is None:
        out = np.empty((rows, n_cols), np.float32)
    if ggml_type == GGMLType.F32:
        out[...] = data
    elif ggml_type == GGMLType.F16:
        deq_f16(data, out)
    elif ggml_type == GGMLType.BF16:
        deq_bf16(data, out)
    elif ggml_type in _LOCAL_DEQ:
        _LOCAL_DEQ[ggml_type](data, out)
    else:
        from qtool import kernels
        kernels._module(ggml_type).dequantize(data, out)
    return out


# ---- the weight and the dispatcher -------------------------------------------------------------------------------
class Weight:
    """A 2-D weight: `data` is float32 (N, K) for F32, uint16 bits (N, K) for F16/BF16 (views of the memory map),
    or, for quantized types, `planes`: the packed rows repacked for the fused kernels (matvec.py), in memory."""
    __slots__ = ("name", "ggml_type", "data", "planes", "n_out", "n_in", "n_blocks")

    def __init__(self, name: str, ggml_type: GGMLType, data: np.ndarray, n_out: int, n_in: int):
        self.name, self.ggml_type, self.n_out, self.n_in = name, ggml_type, n_out, n_in
        info = TYPE_INFO[ggml_type]
        self.n_blocks = n_in // info.block_size
        if ggml_type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
            self.data, self.planes = data, None
        else:
            self.data, self.planes = None, mv.to_planes(data, info.type_size)

    @property
    def nbytes(self) -> int:
        return (self.data if self.planes is None else self.planes).nbytes

    def stored_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 as the file stores them."""
        if self.planes is None:
            return self.data[r0:r1]
        return mv.from_planes(self.planes[r0:r1], self.n_blocks)


def embedding_rows(ggml_type: GGMLType, data: np.ndarray, ids, n_cols: int) -> np.ndarray:
    """Rows `ids` of a stored matrix dequantized to float32 (token embedding lookup)."""
    ids = np.asarray(ids, dtype=np.int64)
    return dequantize_rows(ggml_type, np.ascontiguousarray(data[ids]), n_cols)


_FUSED = {
    GGMLType.Q8_0: mv.mv_q8_0, GGMLType.Q4_0: mv.mv_q4_0, GGMLType.Q4_1: mv.mv_q4_1, GGMLType.Q5_0: mv.mv_q5_0,
    GGMLType.Q5_1: mv.mv_q5_1, GGMLType.Q2_K: mv.mv_q2_k, GGMLType.Q3_K: mv.mv_q3_k, GGMLType.Q4_K: mv.mv_q4_k,
    GGMLType.Q5_K: mv.mv_q5_k, GGMLType.Q6_K: mv.mv_q6_k,
}


def matvec(w: Weight, act: Act) -> np.ndarray:
    """Fused kernels: out (T, N)."""
    T = act.x.shape[0]
    out = np.empty((T, w.n_out), np.float32)
    t = w.ggml_type
    if t == GGMLType.F32:
        np.matmul(act.x, w.data.T, out=out)
    elif t == GGMLType.F16:
        mv.run(mv.mv_f16, w.data, act.x, out)
    elif t == GGMLType.BF16:
        mv.run(mv.mv_bf16, w.data, act.x, out)
    elif t == GGMLType.Q8_0:
        codes, scales, _ = act.planes()
        mv.run(mv.mv_q8_0, w.planes, codes, scales, out)
    else:
        mv.run(_FUSED[t], w.planes, *act.planes(), out)
    return out


def matmul_blocked(w: Weight, act: Act) -> np.ndarray:
    """Tiles of W dequantized to float32, multiplied with BLAS: out (T, N)."""
    x = act.dequantized()
    T = x.shape[0]
    out = np.empty((T, w.n_out), np.float32)
    if w.ggml_type == GGMLType.F32:
        np.matmul(x, w.data.T, out=out)
        return out
    tile = max(16, TILE_BYTES // (4 * w.n_in))
    buf = np.empty((min(tile, w.n_out), w.n_in), np.float32)
    for r0 in range(0, w.n_out, tile):
        r1 = min(w.n_out, r0 + tile)
        b = buf[:r1 - r0]
        dequantize_rows(w.ggml_type, w.stored_rows(r0, r1), w.n_in, b)
        np.matmul(x, b.T, out=out[:, r0:r1])
    return out


class _Pools:
    """One thread pool at a time. numba's workers and OpenBLAS's both spin-wait for work after each call; used in
    turn on the same cores they slow each other several-fold (measured: a 256-token window of stories3M 0.45 s
    with both pools live, 0.08 s with one). So the blocked path gets BLAS's threads with numba on one, the fused
    path numba's threads with BLAS on one, and small fused products one thread of each; switching is two cheap
    calls and happens only when the path changes."""

    def __init__(self) -> None:
        self.mode = ""
        self.threads = 0
        self.blas = None

    def use(self, mode: str) -> None:
        if mode == self.mode:
            return
        import numba
        if self.blas is None:
            from threadpoolctl import ThreadpoolController
            self.blas = ThreadpoolController().select(user_api="blas").lib_controllers
            self.threads = self.threads or numba.get_num_threads()
        numba.set_num_threads(self.threads if mode == "numba" else 1)
        for lib in self.blas:
            lib.set_num_threads(self.threads if mode == "blas" else 1)
        self.mode = mode


POOLS = _Pools()


def set_threads(n: int) -> None:
    """Threads for both paths (at most numba's NUMBA_NUM_THREADS)."""
    import numba
    POOLS.threads = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    POOLS.mode = ""


def linear(w: Weight, x: np.ndarray, act: Act | None = None) -> np.ndarray:
    """y = x @ W.T for x float32 (T, K), llama.cpp's way (activations in the weight type's vec_dot_type).

    `act` may carry x already converted (several weights of one type share one input)."""
    if act is None or act.kind != VEC_DOT_TYPE[w.ggml_type]:
        act = Act(VEC_DOT_TYPE[w.ggml_type], x)
    if act.x.shape[0] >= BLAS_MIN_TOKENS:
        POOLS.use("blas")
        return matmul_blocked(w, act)
    # waking the workers costs tens of microseconds, more than a small product takes on one core
    POOLS.use("numba" if act.x.shape[0] * w.n_out * w.n_in >= SMALL_WORK else "serial")
    return matvec(w, act)


def check_type(ggml_type: GGMLType, n_in: int) -> str | None:
    """Why a weight of this type and row length cannot be multiplied, or None."""
    if ggml_type not in SUPPORTED:
        return f"type {ggml_type.name} is not supported by the runner"
    bs = TYPE_INFO[ggml_type].block_size
    need = {"q8_0": 32, "q8_1": 32, "q8_k": QK_K}.get(VEC_DOT_TYPE[ggml_type], 1)
    if n_in % max(bs, need):
        return f"rows of {n_in} are not a multiple of {max(bs, need)}"
    return None
