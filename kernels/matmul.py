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

from .common import fp16_bits, fp16_value, round_bf16, round_f16  # noqa: F401 (round_*: public)
from . import matvec as mv
from .traits import TRAITS

F0 = np.float32(0.0)
BLAS_MIN_TOKENS = 8  # from this many tokens on, dequantize tiles and use BLAS
TILE_BYTES = 4 << 20  # float32 bytes of one dequantized tile
SMALL_WORK = 1 << 20  # multiply-adds below which a fused product runs on one thread
# elements per block of each quantized activation kind (the ggml types the activations are converted to; Q8_1,
# never stored, has no TYPE_INFO row: its blocks are Q8_0's 32)
ACT_BLOCK = {"q8_0": TYPE_INFO[GGMLType.Q8_0].block_size, "q8_1": TYPE_INFO[GGMLType.Q8_0].block_size,
             "q8_k": TYPE_INFO[GGMLType.Q8_K].block_size}


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


class Act:
    """Activations converted to a weight type's vec_dot_type (all arrays float32)."""
    __slots__ = ("kind", "x", "q", "d", "s", "_deq", "_planes")

    def __init__(self, kind: str, x: np.ndarray):
        self.kind = kind
        self._deq = None
        self._planes: dict = {}
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
            self.d = np.empty((T, K // ACT_BLOCK[kind]), np.float32)
            self.s = np.empty((T, K // ACT_BLOCK[kind]), np.float32)
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
                bs = ACT_BLOCK[self.kind]
                self._deq = (self.q.reshape(T, K // bs, bs) * self.d[:, :, None]).reshape(T, K)
        return self._deq

    def planes(self, group: int = 1, n_lanes: int | None = None) -> tuple[np.ndarray, ...]:
        """The quantized activations laid out as matvec.py's kernels read them, blocks last: int16 codes (T, per
        block, lanes), scales (T, lanes) and, for Q8_0, the sums of each block's codes; for Q8_1, fp16(d * sum);
        for Q8_K, the sums of each 16 codes (T, 16, lanes). For a weight whose planes rows hold `group` rows
        (matvec.py's row groups) the blocks repeat `group` times, lane p * blocks + b holding block b, then zeros
        to n_lanes (default: the blocks padded to MAX_LANES, which every weight of group 1 fits)."""
        key = (group, n_lanes)
        if key not in self._planes:
            T, K = self.q.shape
            bs = ACT_BLOCK[self.kind]
            nb = K // bs
            lanes = mv.n_lanes(nb, mv.MAX_LANES) if n_lanes is None else n_lanes

            def tiled(a, inner, dtype=np.float32):
                out = np.empty((T, inner, lanes), dtype)
                _tile_lanes(a, group, out)
                return out if inner > 1 else out.reshape(T, lanes)

            codes = tiled(self.q, bs, np.int16)
            if self.kind == "q8_0":
                extra = tiled(self.q.reshape(T, nb, bs).sum(axis=2, dtype=np.float32), 1)
            elif self.kind == "q8_1":
                extra = tiled(self.s, 1)
            else:
                extra = tiled(self.s, 16)
            self._planes[key] = (codes, tiled(self.d, 1), extra)
        return self._planes[key]


@njit(cache=True)
def _tile_lanes(a, group, out):
    """a (T, blocks * inner) → out (T, inner, lanes): element j of block b at [t, j, p * blocks + b] for each
    p < group, zeros in the lanes after (one call: a decode step converts several activations)."""
    T, inner, lanes = out.shape
    nb = a.shape[1] // inner
    for t in range(T):
        for j in range(inner):
            for p in range(group):
                for b in range(nb):
                    out[t, j, p * nb + b] = a[t, b * inner + j]
            for b in range(group * nb, lanes):
                out[t, j, b] = 0


VEC_DOT_TYPE = {t: r.vec_dot for t, r in TRAITS.items() if r.vec_dot is not None}
SUPPORTED = frozenset(VEC_DOT_TYPE)


# ---- row dequantization (for the blocked path and embeddings) ---------------------------------------------------
def dequantize_rows(ggml_type: GGMLType, data: np.ndarray, n_cols: int, out: np.ndarray | None = None) -> np.ndarray:
    """Stored rows (uint8 packed, or uint16 bits for F16/BF16, or float32) → float32 (rows, n_cols)."""
    rows = data.shape[0]
    if out is None:
        out = np.empty((rows, n_cols), np.float32)
    TRAITS[ggml_type].dequantize(data, out)
    return out


# ---- the weight and the dispatcher -------------------------------------------------------------------------------
class Weight:
    """A 2-D weight: `data` is float32 (N, K) for F32, uint16 bits (N, K) for F16/BF16 (views of the memory map),
    or, for quantized types, `planes`: the packed rows repacked for the fused kernels (matvec.py), in memory,
    `group` rows to a planes row, `seg` the row within the group of each lane."""
    __slots__ = ("name", "ggml_type", "data", "planes", "n_out", "n_in", "n_blocks", "group", "seg")

    def __init__(self, name: str, ggml_type: GGMLType, data: np.ndarray, n_out: int, n_in: int):
        self.name, self.ggml_type, self.n_out, self.n_in = name, ggml_type, n_out, n_in
        info = TYPE_INFO[ggml_type]
        self.n_blocks = n_in // info.block_size
        self.group, self.seg = 1, None
        if ggml_type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
            self.data, self.planes = data, None
        else:
            row = TRAITS[ggml_type]
            lanes = row.lanes
            self.group = mv.group_size(self.n_blocks, lanes, 64 if row.int16_vectors else 32)
            self.data, self.planes = None, mv.to_planes(data, info.type_size, lanes, self.group)
            self.seg = mv.lane_rows(self.n_blocks, self.group, self.planes.shape[2])

    @property
    def nbytes(self) -> int:
        return (self.data if self.planes is None else self.planes).nbytes

    def __call__(self, x: np.ndarray, acts: dict | None = None) -> np.ndarray:
        """y = x @ W.T for x float32 (T, K), llama.cpp's way. `acts`, a dict shared by the weights applied to the
        same x, is filled with one `Act` per vec_dot kind so each conversion of x happens once."""
        kind = VEC_DOT_TYPE[self.ggml_type]
        act = None
        if acts is not None:
            act = acts.get(kind)
            if act is None:
                act = acts[kind] = Act(kind, x)
        return linear(self, x, act)

    def stored_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 as the file stores them."""
        if self.planes is None:
            return self.data[r0:r1]
        g = self.group
        rows = mv.from_planes(self.planes[r0 // g:-(-r1 // g)], self.n_blocks, g)
        return rows[r0 - r0 // g * g:r1 - r0 // g * g]


def embedding_rows(ggml_type: GGMLType, data: np.ndarray, ids, n_cols: int) -> np.ndarray:
    """Rows `ids` of a stored matrix dequantized to float32 (token embedding lookup)."""
    ids = np.asarray(ids, dtype=np.int64)
    return dequantize_rows(ggml_type, np.ascontiguousarray(data[ids]), n_cols)


def matvec(w: Weight, act: Act) -> np.ndarray:
    """Fused kernels: out (T, N)."""
    T = act.x.shape[0]
    out = np.empty((T, w.n_out), np.float32)
    t = w.ggml_type
    if t == GGMLType.F32:
        np.matmul(act.x, w.data.T, out=out)
    elif w.planes is None:  # F16, BF16: the rounded activations as they are
        mv.run(TRAITS[t].fused_kernel(), w.data, act.x, out)
    else:
        planes = act.planes(w.group, w.planes.shape[2])
        if t == GGMLType.Q8_0:  # no offset to move out of the inner sums: no code sums
            planes = planes[:2]
        mv.run(TRAITS[t].fused_kernel(), w.planes, *planes, w.seg, w.group, out)
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
    need = ACT_BLOCK.get(VEC_DOT_TYPE[ggml_type], 1)
    if n_in % max(bs, need):
        return f"rows of {n_in} are not a multiple of {max(bs, need)}"
    return None
