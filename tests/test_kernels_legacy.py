"""Q4_0, Q4_1, Q5_0, Q5_1 kernels against llama.cpp's ggml_quantize_chunk (byte for byte) and gguf-py.

Oracles: llama.cpp itself (tests skip without the reference extra); gguf-py's quants.py, which follows
llama.cpp's reference code and agrees with it except on zero signs and on inf/NaN (see ADVERSARIAL).
"""
from __future__ import annotations

import numpy as np
import pytest
from llama_oracle import ggml_quantize, need_llama_cpp
from rows import wide_scale_rows as random_rows

from qtool import kernels
from qtool.formats.constants import TYPE_INFO, GGMLType

gguf = pytest.importorskip("gguf", reason="needs gguf-py (the test extra)")

TYPES = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1]
AFFINE = {GGMLType.Q4_1, GGMLType.Q5_1}  # d * q + m; the others are d * (q - 2^(bits-1))
BITS = {GGMLType.Q4_0: 4, GGMLType.Q4_1: 4, GGMLType.Q5_0: 5, GGMLType.Q5_1: 5}
f32 = np.float32


def gguf_type(t: GGMLType) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[t.name]


def adversarial_blocks() -> tuple[np.ndarray, np.ndarray]:
    """Blocks (n, 32) that stress edge cases, and a mask of those where gguf-py writes what llama.cpp writes."""
    rng = np.random.default_rng(11)
    blocks, gguf_agrees = [], []

    def add(b, agrees=True):
        blocks.append(np.asarray(b, dtype=f32))
        gguf_agrees.append(agrees)

    add(np.zeros(32))  # Q4_0/Q5_0 store d = 0/-8 = -0.0 (0x8000)
    add(np.full(32, -0.0), agrees=False)  # llama.cpp keeps max = +0 → d = -0; gguf-py takes the -0 → d = +0
    add(np.where(np.arange(32) % 2, f32(-0.0), f32(0.0)), agrees=False)  # Q4_1/Q5_1: min is the first zero, +0
    for c in (1.0, -1.0, 3.7, -1e-3, 65504.0, 1e5, 1e30, -1e30, 3e38, -3e38, 1e-45, -1e-45, 1e-40, 6e-8, 1e-38):
        add(np.full(32, c))
    base = rng.standard_normal(32)
    add(np.where(np.arange(32) == 5, 1e4, base))  # one huge outlier
    add(np.where(np.arange(32) == 7, -1e30, base))  # d overflows fp16 to -inf
    for s in (1e-45, 1e-44, 1e-42, 1e-39, 1e-38, 2.0**-126, 2.0**-125, 2.0**-124, 2.0**-122, 1e-30, 1e25, 1e35, 1e38):
        add(rng.standard_normal(32) * s)  # subnormal steps, 1/d overflowing to inf, d overflowing fp16
    b = rng.standard_normal(32)
    add(np.concatenate([[3.0, -3.0], b[2:]]))  # ties in magnitude: the first one sets the sign of d
    add(np.concatenate([[-3.0, 3.0], b[2:]]))
    add(np.where(np.arange(32) == 3, -2.0, 2.0))
    add(np.array([3e38, -3e38] + [0.0] * 30))  # max - min overflows to inf
    add(np.array([3.4e38] * 16 + [-3.4e38] * 16))
    grid = rng.integers(-8, 8, 32)
    add(grid)  # codes land exactly on x/d + 0.5 boundaries
    add(grid * f32(0.1))
    add(grid + f32(0.5))
    add(rng.standard_normal(32) * 1e-3 + 1e4)  # large offset, small spread
    for special in (np.inf, -np.inf, np.nan):  # llama.cpp's casts of inf/NaN, which gguf-py does not mirror
        add(np.where(np.arange(32) == 4, special, rng.standard_normal(32)), agrees=False)
        add(np.full(32, special), agrees=False)
    b = rng.standard_normal(32)
    b[[0, 9, 10]] = [np.nan, np.inf, -np.inf]
    add(b, agrees=False)
    return np.stack(blocks), np.array(gguf_agrees)


def assert_same_floats(a: np.ndarray, b: np.ndarray):
    """Equal bit for bit, except that any NaN matches any NaN."""
    same = (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))
    assert same.all(), f"{(~same).sum()} of {a.size} values differ"


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_quantize_equals_llama_cpp_on_random_rows(t):
    need_llama_cpp()
    for seed in (0, 1):
        x = random_rows(seed)
        np.testing.assert_array_equal(kernels.quantize(t, x), ggml_quantize(x, t))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_quantize_equals_llama_cpp_on_adversarial_blocks(t):
    need_llama_cpp()
    x, _ = adversarial_blocks()
    ours, ref = kernels.quantize(t, x), ggml_quantize(x, t)
    bad = np.flatnonzero((ours != ref).any(axis=1))
    assert bad.size == 0, f"blocks {bad.tolist()} differ, first: {x[bad[0]]} → {ours[bad[0]]} vs {ref[bad[0]]}"
    # whole rows of such blocks too, so one row holds many kinds of block
    rows = x[: x.shape[0] // 8 * 8].reshape(-1, 8 * 32)
    np.testing.assert_array_equal(kernels.quantize(t, rows), ggml_quantize(rows, t))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_quantize_equals_llama_cpp_on_random_bit_patterns(t):
    """Every float32 bit pattern is fair game: random exponents, subnormals, inf, NaN."""
    need_llama_cpp()
    bits = np.random.default_rng(5).integers(0, 2**32, (256, 32 * 16), dtype=np.uint64).astype(np.uint32)
    x = bits.view(f32)
    np.testing.assert_array_equal(kernels.quantize(t, x), ggml_quantize(x, t))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_quantize_equals_gguf_py(t):
    x = random_rows(2)
    np.testing.assert_array_equal(kernels.quantize(t, x), gguf.quants.quantize(x, gguf_type(t)))
    adv, agrees = adversarial_blocks()
    adv = adv[agrees]
    with np.errstate(all="ignore"):
        ref = gguf.quants.quantize(adv, gguf_type(t))
    np.testing.assert_array_equal(kernels.quantize(t, adv), ref)


def test_zero_blocks_are_written_as_llama_cpp_writes_them():
    """Hand-checked against ggml_quantize_chunk: the "_0" types store d = -0.0, the "_1" types +0."""
    zero = np.zeros((1, 32), f32)
    assert kernels.quantize(GGMLType.Q4_0, zero).tobytes() == b"\x00\x80" + b"\x88" * 16
    assert kernels.quantize(GGMLType.Q5_0, zero).tobytes() == b"\x00\x80" + b"\xff" * 4 + b"\x00" * 16
    assert kernels.quantize(GGMLType.Q4_1, zero).tobytes() == bytes(20)
    assert kernels.quantize(GGMLType.Q5_1, zero).tobytes() == bytes(24)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_py(t):
    adv, _ = adversarial_blocks()
    for x in (random_rows(3), adv):
        with np.errstate(all="ignore"):
            q = kernels.quantize(t, x)
            ref = gguf.quants.dequantize(q, gguf_type(t)).reshape(x.shape)
        assert_same_floats(kernels.dequantize(t, q, x.shape[1]), ref)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dequantize_random_bytes_equals_gguf_py(t):
    """Any bytes decode as gguf-py decodes them, fp16 subnormals, inf and NaN scales included."""
    info = TYPE_INFO[t]
    q = np.random.default_rng(6).integers(0, 256, (64, 8 * info.type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(q, gguf_type(t)).reshape(64, -1)
    assert_same_floats(kernels.dequantize(t, q, 8 * info.block_size), ref)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_round_trip_error_is_within_the_step(t):
    """Per block, with step d (float64 here) and fp16 rounding of d and m (relative 2^-11):

    "_1" types:  |x - x̂| <= d/2 + (2^bits - 1)·d·2^-11 + |min|·2^-11
    "_0" types:  |x - x̂| <= |d|/2 + 2^(bits-1)·|d|·2^-11, except weights within half a step of -max (the
                 top code is clamped: x/d = 2^(bits-1) rounds to 2^bits, stored as 2^bits - 1), where it is |d| + …
    plus a few float32 ulps of the block's range.
    """
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal((16, 512)) * s for s in (0.05, 1.0, 100.0)]).astype(f32)
    dq = kernels.dequantize(t, kernels.quantize(t, x), x.shape[1])
    blocks = x.reshape(-1, 32).astype(np.float64)
    err = np.abs(dq.reshape(-1, 32) - blocks)
    bits = BITS[t]
    slack = 1e-6 * np.abs(blocks).max(axis=1, keepdims=True)
    if t in AFFINE:
        lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
        d = (hi - lo) / (2**bits - 1)
        bound = d / 2 + (2**bits - 1) * d * 2.0**-11 + np.abs(lo) * 2.0**-11 + slack
    else:
        half = 2 ** (bits - 1)
        m = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
        d = np.abs(m / -half)
        clamped = blocks * (-half / m) > half - 0.5
        bound = np.where(clamped, d, d / 2) + half * d * 2.0**-11 + slack
    assert (err <= bound).all(), f"worst excess {(err - bound).max()}"
    # and the bound is tight-ish: on Gaussian data the mean error is about a quarter step
    assert 0.15 < (err / d).mean() < 0.35


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_shapes_and_registry(t):
    assert t in kernels.quantizable_types()
    info = TYPE_INFO[t]
    x = np.random.default_rng(8).standard_normal((2, 3, 64)).astype(f32)  # leading dims are flattened to rows
    q = kernels.quantize(t, x)
    assert q.shape == (6, 2 * info.type_size) and q.dtype == np.uint8
    assert kernels.dequantize(t, q, 64).shape == (6, 64)
    np.testing.assert_array_equal(q[4], kernels.quantize(t, x[1, 1:2])[0])  # rows are independent
    with pytest.raises(ValueError):
        kernels.quantize(t, np.zeros((1, 48), f32))
