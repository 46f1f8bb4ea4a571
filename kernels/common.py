"""Numerics shared by every kernel: ggml's rounding and fp16/bf16 conversion, bit for bit, written once.

They run inside numba kernels. Rounding works on exact float64 arithmetic (every float32 value is exact in
float64); fp16 conversion works on float32 bit patterns (numba views scalars), which keeps it cheap enough to
run once per block. All are identical to ggml's C code.

Deliberate variants, each for a reason:
- rounding: `roundf` (C's, halves away from zero) is what the reference quantizers (quantize_row_q8_0_ref ...)
  use; `round_half_even`/`nearest_int` is ggml's nearest_int() and what llama.cpp's AVX code does when it
  quantizes activations (matmul.quantize_act_q8_0 uses np.rint, the same rounding, so it vectorizes).
- fp16 → float32: `fp16_value` branches and keeps NaN payloads exactly (codecs, once per block); `h2f` is
  branch-free so that loops over it vectorize (decode kernels, attention), equal to it on every input.
- float32 → fp16/bf16 over whole arrays (activations): `round_f16`, `round_bf16` in numpy; kernels/convert.py
  has its own integer ports of numpy's conversions, which it must match bit for bit, NaN payloads included.
"""
import math

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def round_half_even(x: float) -> float:
    """rint() with ties to even, as ggml's nearest_int() (the 1.5*2^23 trick) and fp16 conversion do."""
    f = math.floor(x)
    d = x - f
    if d > 0.5 or (d == 0.5 and f % 2.0 != 0.0):
        return f + 1.0
    return f


@njit(cache=True, inline="always")
def nearest_int(x: np.float32) -> int:
    """ggml's nearest_int(): round a float32 to the nearest integer, ties to even."""
    return int(round_half_even(x))


@njit(cache=True, inline="always")
def roundf(x: np.float32) -> float:
    """C roundf(): halves away from zero."""
    a = math.floor(abs(x) + 0.5)  # exact: |x| + 0.5 is exact in float64 for any float32 x
    return a if x >= 0 else -a


@njit(cache=True, inline="always")
def fp16_bits(f: np.float32) -> int:
    """IEEE binary16 bits of a float32 value, round to nearest even, as ggml's fp32→fp16 (NaN → sign|0x7E00).

    Works on the float32 bit pattern (f is taken as float32 first); checked against numpy for all 2^32 inputs.
    """
    u = int(np.float32(f).view(np.uint32))
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a >= 0x477FF000:  # >= 65520 rounds to inf; inf; NaN
        return sign | (0x7E00 if a > 0x7F800000 else 0x7C00)
    if a >= 0x38800000:  # normal half: drop 13 mantissa bits, ties to even; a carry moves into the exponent
        return sign | (((a + 0xFFF + ((a >> 13) & 1)) >> 13) - (112 << 10))
    # subnormal half or zero, in units of 2^-24: the 24-bit significand shifted right by 126 - exponent >= 14
    s = 126 - (a >> 23)
    if s > 24:
        return sign
    m = (a & 0x7FFFFF) | 0x800000
    q = m >> s
    rem = m - (q << s)
    half = 1 << (s - 1)
    if rem > half or (rem == half and q & 1):
        q += 1  # a carry into 1024 is the smallest normal, which encodes the same way
    return sign | q


@njit(cache=True, inline="always")
def fp16_value(bits: int) -> np.float32:
    """float32 value of IEEE binary16 bits (NaN payloads kept, as ggml's fp16→fp32)."""
    sign = (bits & 0x8000) << 16
    exp = (bits >> 10) & 0x1F
    mant = bits & 0x3FF
    if exp == 0:
        v = np.float32(np.float32(mant) * np.float32(5.9604644775390625e-08))  # mant * 2^-24, exact
        return -v if sign else v
    if exp == 31:
        return np.uint32(sign | 0x7F800000 | (mant << 13)).view(np.float32)
    return np.uint32(sign | ((exp + 112) << 23) | (mant << 13)).view(np.float32)


@njit(cache=True, inline="always")
def store_fp16(out: np.ndarray, pos: int, value: float) -> np.float32:
    """Write value as little-endian fp16 at out[pos:pos+2]; return the float32 it rounds to."""
    b = fp16_bits(value)
    out[pos] = b & 0xFF
    out[pos + 1] = b >> 8
    return fp16_value(b)


@njit(cache=True, inline="always")
def load_fp16(buf: np.ndarray, pos: int) -> np.float32:
    return fp16_value(int(buf[pos]) | (int(buf[pos + 1]) << 8))


TWO112 = np.float32(5.192296858534828e33)  # 2**112: turns half bits << 13 into the half's value


@njit(cache=True, inline="always")
def h2f(h) -> np.float32:
    """fp16 bits → float32, branch-free so loops over it vectorize (inf/NaN kept)."""
    hi = np.uint32(h)
    em = hi & np.uint32(0x7FFF)
    f = np.float32(np.uint32(em << np.uint32(13)).view(np.float32) * TWO112)
    bits = f.view(np.uint32)
    if em >= np.uint32(0x7C00):
        bits = (em << np.uint32(13)) | np.uint32(0x7F800000)
    return np.uint32(bits | ((hi & np.uint32(0x8000)) << np.uint32(16))).view(np.float32)


@njit(cache=True, inline="always")
def bf2f(h) -> np.float32:
    """bf16 bits → float32 (exact)."""
    return np.uint32(np.uint32(h) << np.uint32(16)).view(np.float32)


def round_f16(x: np.ndarray) -> np.ndarray:
    """float32 → fp16 → float32, round to nearest even (numpy's conversion equals ggml's)."""
    return x.astype(np.float16).astype(np.float32)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 → float32, round to nearest even (ggml's GGML_FP32_TO_BF16; NaN kept quiet)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = np.where(nan, (u >> 16 | 64) << 16, r)
    return r.astype(np.uint32).view(np.float32).reshape(x.shape)
