"""Scalar helpers shared by every kernel: ggml's rounding and fp16 encoding, bit for bit.

They run inside numba kernels, so they avoid bit views of scalars and work on exact float64 arithmetic: every
float32 value is exact in float64, which keeps the results identical to ggml's C code.
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
def fp16_bits(f: float) -> int:
    """IEEE binary16 bits of a float32 value, round to nearest even (what F16C and numpy do)."""
    if f != f:
        return 0x7E00
    sign = 0
    if f < 0.0 or (f == 0.0 and math.copysign(1.0, f) < 0.0):
        sign = 0x8000
    a = abs(f)
    if a == 0.0:
        return sign
    if a == math.inf:
        return sign | 0x7C00
    m, e = math.frexp(a)  # a = m * 2**e, 0.5 <= m < 1
    exp16 = e + 14
    if exp16 >= 1:
        r = int(round_half_even(m * 2048.0))  # 11 significant bits
        if r == 2048:
            r = 1024
            exp16 += 1
        if exp16 >= 31:
            return sign | 0x7C00
        return sign | (exp16 << 10) | (r - 1024)
    # subnormal: units of 2**-24; a carry into 1024 is the smallest normal, which encodes the same way
    return sign | int(round_half_even(math.ldexp(m, e + 24)))


@njit(cache=True, inline="always")
def fp16_value(bits: int) -> np.float32:
    """float32 value of IEEE binary16 bits."""
    sign = -1.0 if bits & 0x8000 else 1.0
    exp = (bits >> 10) & 0x1F
    mant = bits & 0x3FF
    if exp == 0:
        return np.float32(sign * math.ldexp(mant, -24))
    if exp == 31:
        return np.float32(sign * math.inf) if mant == 0 else np.float32(math.nan)
    return np.float32(sign * math.ldexp(1024 + mant, exp - 25))


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
