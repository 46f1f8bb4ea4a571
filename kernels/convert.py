"""Float format conversion kernels: BF16 / F16 / F32 source values → F32 / F16 / BF16, parallel over rows, with
an optional row gather (the Q/K permutation, or a slab of rows) and a NaN/Inf check in the same pass.

numpy's `astype(float16)` and the bf16 → f32 widening run on one core and need temporaries the size of the
tensor; these kernels read the (memory-mapped) source once, write the result once, and use every core.

Results are bit-identical to numpy (checked on all 2**32 float32 patterns): 16-bit sources go through a
65536-entry table that numpy computes (float16 via astype, bfloat16 round-to-nearest-even as qtool's encoder);
float32 sources use integer ports of numpy's `npy_floatbits_to_halfbits` (nearest even, subnormals, overflow to
±inf, signed zeros) and of the bfloat16 rounding. Source dtypes are the stored bit patterns: "BF16" as uint16,
"F16" as float16 or uint16, "F32" as float32 or uint32.

    out, finite = convert(src, "BF16", "F16", rows=perm)   # out[r] = f16(src[perm[r]]); finite: no NaN/Inf
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

TARGET_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
SOURCE_BITS = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32}


# ---- scalar bit conversions (inlined into the kernels) ----------------------------------------------------------
@njit(cache=True, inline="always")
def _f32_to_f16_bits(f: np.int64) -> np.int64:
    """numpy's npy_floatbits_to_halfbits: float32 bits → half bits, round to nearest even."""
    h_sgn = (f & 0x80000000) >> 16
    f_exp = f & 0x7F800000
    if f_exp >= 0x47800000:
        if f_exp == 0x7F800000:
            f_sig = f & 0x007FFFFF
            if f_sig != 0:
                ret = 0x7C00 + (f_sig >> 13)
                if ret == 0x7C00:
                    ret += 1
                return h_sgn + ret
            return h_sgn + 0x7C00
        return h_sgn + 0x7C00
    if f_exp <= 0x38000000:
        if f_exp < 0x33000000:
            return h_sgn
        e = f_exp >> 23
        f_sig = 0x00800000 + (f & 0x007FFFFF)
        f_sig >>= 113 - e
        if (f_sig & 0x00003FFF) != 0x00001000 or (f & 0x000007FF) != 0:
            f_sig += 0x00001000
        return h_sgn + (f_sig >> 13)
    h_exp = (f_exp - 0x38000000) >> 13
    f_sig = f & 0x007FFFFF
    if (f_sig & 0x00003FFF) != 0x00001000:
        f_sig += 0x00001000
    return h_sgn + (f_sig >> 13) + h_exp


@njit(cache=True, inline="always")
def _f32_to_bf16_bits(f: np.int64) -> np.int64:
    """Round to nearest even, as qtool's numpy encoder (and torch for finite values)."""
    return ((f + 0x7FFF + ((f >> 16) & 1)) >> 16) & 0xFFFF


@njit(cache=True, inline="always")
def _store(dst_kind: int, f: np.int64) -> np.int64:
    """float32 bits → output bits. dst_kind: 0 BF16, 1 F16, 2 F32."""
    if dst_kind == 0:
        return _f32_to_bf16_bits(f)
    if dst_kind == 1:
        return _f32_to_f16_bits(f)
    return f


# ---- kernels ----------------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def _lookup_rows(src, rows, table, special, out):
    """16-bit sources: out[r, j] = table[src[rows[r], j]]; counts values whose exponent bits are all ones
    (`special` is the exponent mask: NaN/Inf). A 64K-entry table stays in L2 and makes every result exactly
    what numpy computes, by construction."""
    n_rows, n_cols = out.shape
    bad = 0
    for r in prange(n_rows):
        s = src[rows[r]]
        o = out[r]
        n_bad = 0
        for j in range(n_cols):
            v = s[j]
            o[j] = table[v]
            n_bad += (v & special) == special
        bad += n_bad
    return bad


@njit(parallel=True, cache=True)
def _widen_bf16_rows(src, rows, out):
    """BF16 → F32 bits: a shift."""
    n_rows, n_cols = out.shape
    bad = 0
    for r in prange(n_rows):
        s = src[rows[r]]
        o = out[r]
        n_bad = 0
        for j in range(n_cols):
            v = np.uint32(s[j])
            o[j] = v << np.uint32(16)
            n_bad += (v & np.uint32(0x7F80)) == np.uint32(0x7F80)
        bad += n_bad
    return bad


@njit(parallel=True, cache=True)
def _from_f32_rows(src, rows, out, dst_kind):
    """F32 sources: out[r, :] = convert(src[rows[r], :]) with the bit-exact scalar conversions above."""
    n_rows, n_cols = out.shape
    bad = 0
    for r in prange(n_rows):
        s = src[rows[r]]
        o = out[r]
        n_bad = 0
        for j in range(n_cols):
            f = np.int64(s[j])
            n_bad += (f & 0x7F800000) == 0x7F800000
            o[j] = _store(dst_kind, f)
        bad += n_bad
    return bad


_KIND = {"BF16": 0, "F16": 1, "F32": 2}
_SPECIAL = {"BF16": 0x7F80, "F16": 0x7C00}
_TABLES: dict[tuple[str, str], np.ndarray] = {}


def _table(src_dtype: str, target: str) -> np.ndarray:
    """Output bits for each of the 65536 16-bit source patterns, computed by numpy."""
    key = (src_dtype, target)
    if key not in _TABLES:
        bits = np.arange(1 << 16, dtype=np.uint32)
        f32 = (bits << 16).view(np.float32) if src_dtype == "BF16" else bits.astype(np.uint16).view(np.float16) \
            .astype(np.float32)
        with np.errstate(all="ignore"):
            if target == "F32":
                table = f32.view(np.uint32).copy()
            elif target == "F16":
                table = f32.astype(np.float16).view(np.uint16)
            else:
                b = f32.view(np.uint32).astype(np.uint64)
                table = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
        _TABLES[key] = np.ascontiguousarray(table)
    return _TABLES[key]


def convert(src: np.ndarray, src_dtype: str, target: str, rows: np.ndarray | None = None,
            out: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """Convert stored values to `target` ("F32" → float32, "F16" → float16, "BF16" → uint16 bits).

    src: the stored values, 1-D or 2-D (more dimensions are flattened to rows of the last axis).
    rows: optional int array; output row r is source row rows[r] (a permutation, or a slab of rows).
    out: optional preallocated output of the right shape and dtype.
    Returns (out, finite) where finite is False if any converted source value was NaN or ±Inf.
    """
    src_dtype, target = src_dtype.upper(), target.upper()
    if src_dtype not in _KIND or target not in TARGET_DTYPES:
        raise ValueError(f"cannot convert {src_dtype} to {target}")
    bits = np.ascontiguousarray(src).view(SOURCE_BITS[src_dtype])
    src2 = bits.reshape(1, -1) if bits.ndim <= 1 else bits.reshape(-1, bits.shape[-1])
    if rows is None:
        out_shape = src.shape
        rows = np.arange(src2.shape[0], dtype=np.int64)
    else:
        if bits.ndim < 2:
            raise ValueError("rows= needs a source of at least 2 dimensions")
        rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= src2.shape[0]):
            raise IndexError("rows out of range")
        out_shape = (rows.shape[0], src2.shape[1])
    dtype = TARGET_DTYPES[target]
    if out is None:
        out = np.empty(out_shape, dtype=dtype)
    elif out.dtype != dtype or out.size != rows.shape[0] * src2.shape[1] or not out.flags.c_contiguous:
        raise ValueError("out has the wrong dtype, size or layout")
    out_bits = out.view(np.uint32 if target == "F32" else np.uint16).reshape(rows.shape[0], src2.shape[1])
    if not out_bits.size:
        bad = 0
    elif src_dtype == "F32":
        bad = _from_f32_rows(src2, rows, out_bits, _KIND[target])
    elif (src_dtype, target) == ("BF16", "F32"):
        bad = _widen_bf16_rows(src2, rows, out_bits)
    else:
        bad = _lookup_rows(src2, rows, _table(src_dtype, target), np.uint16(_SPECIAL[src_dtype]), out_bits)
    return out, bad == 0


def encode_stored(raw: np.ndarray, src_dtype: str, target: str, rows: np.ndarray | None = None,
                  quantize=None, out: np.ndarray | None = None, slab: np.ndarray | None = None,
                  slab_bytes: int = 16 << 20) -> tuple[np.ndarray, bool]:
    """A stored tensor (raw BF16/F16/F32 values, e.g. a memory map) → the data of `target`.

    F32 / F16 / BF16 targets are one pass of convert(). For a quantized target, `quantize(x, out)` packs float32
    rows x into the uint8 rows `out` (e.g. `partial(qtool.kernels.quantize, GGMLType.Q8_0)`); it is fed slabs of
    about slab_bytes of float32 rows, so no float32 copy of the whole tensor ever exists. `rows` as in convert():
    output row r is source row rows[r] (the Q/K permutation). `out` (the result: float array of the tensor's
    shape, or uint8 rows for a quantized target) and `slab` (float32 scratch of at least slab_bytes) may be
    buffers the caller reuses across tensors, so that memory is not page-faulted in afresh for each one.
    Returns (data, finite); finite is False if a source value is NaN/Inf.
    """
    target = target.upper()
    if target in TARGET_DTYPES:
        return convert(raw, src_dtype, target, rows, out)
    if quantize is None or out is None:
        raise ValueError(f"{target} needs a quantize function and an output array")
    src2 = raw.reshape(1, -1) if raw.ndim <= 1 else raw.reshape(-1, raw.shape[-1])
    n_rows, n_cols = src2.shape
    if rows is None:
        rows = np.arange(n_rows, dtype=np.int64)
    step = max(1, slab_bytes // (4 * n_cols))
    n_slab = min(step, len(rows)) * n_cols
    slab = np.empty(n_slab, np.float32) if slab is None or slab.size < n_slab else slab.reshape(-1)[:n_slab]
    slab = slab.reshape(-1, n_cols)
    out = out.reshape(len(rows), -1)
    finite = True
    for s0 in range(0, len(rows), step):
        sel = rows[s0:s0 + step]
        x, ok = convert(src2, src_dtype, "F32", sel, out=slab[:len(sel)])
        finite &= ok
        quantize(x, out[s0:s0 + len(sel)])
    return out, finite
