"""The parallel float-format kernels convert uses (kernels/convert.py) against numpy, bit for bit, including every
16-bit pattern, NaN/Inf detection, the row gather that does the Q/K permutation, and slab-wise quantization."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from qtool import kernels
from qtool.formats.constants import GGMLType
from qtool.kernels.convert import convert, encode_stored


def numpy_bf16(f32: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits, round to nearest even (torch's rounding for finite values)."""
    b = f32.view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def numpy_reference(bits: np.ndarray, src: str, target: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        if src == "BF16":
            f32 = (bits.astype(np.uint32) << 16).view(np.float32)
        elif src == "F16":
            f32 = bits.view(np.float16).astype(np.float32)
        else:
            f32 = bits.view(np.float32)
        if target == "F32":
            return f32.view(np.uint32)
        if target == "F16":
            return f32.astype(np.float16).view(np.uint16)
        return numpy_bf16(f32)


def finite_16(bits: np.ndarray, src: str) -> bool:
    mask = 0x7F80 if src == "BF16" else 0x7C00
    return not ((bits & mask) == mask).any()


@pytest.mark.parametrize("src", ["BF16", "F16"])
@pytest.mark.parametrize("target", ["F32", "F16", "BF16"])
def test_every_16_bit_pattern_converts_as_numpy_does(src, target):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    out, finite = convert(bits if src == "BF16" else bits.view(np.float16), src, target)
    want = numpy_reference(bits, src, target)
    np.testing.assert_array_equal(out.view(want.dtype), want)
    assert not finite  # the table holds every NaN and Inf
    ok = bits[:120]  # exponents below all-ones in both formats for the first 120 * 256 patterns
    assert finite_16(ok, src)
    assert convert(ok if src == "BF16" else ok.view(np.float16), src, target)[1]


@pytest.mark.parametrize("target", ["F32", "F16", "BF16"])
def test_float32_bit_patterns_convert_as_numpy_does(target):
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 32, size=(512, 1024), dtype=np.uint64).astype(np.uint32)
    # the rounding edges: halfway cases, f16 subnormals and overflow, bf16 carries into the exponent
    edges = np.array([0x33000000, 0x33000001, 0x387FE000, 0x38801000, 0x477FEFFF, 0x477FF000, 0x47800000,
                      0x3F801000, 0x3F803000, 0x3F807FFF, 0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x7F800000,
                      0x7F800001, 0x7FC00000, 0x00000001, 0x80000000, 0xBF808000], dtype=np.uint32)
    bits[0, :len(edges)] = edges
    bits[1, :len(edges)] = edges | 0x80000000
    out, finite = convert(bits.view(np.float32), "F32", target)
    want = numpy_reference(bits, "F32", target)
    np.testing.assert_array_equal(out.view(want.dtype), want)
    assert not finite
    x = rng.standard_normal((64, 96)).astype(np.float32)
    out, finite = convert(x, "F32", target)
    assert finite and np.array_equal(out.view(np.uint32 if target == "F32" else np.uint16),
                                      numpy_reference(x.view(np.uint32), "F32", target))


@pytest.mark.parametrize("src", ["BF16", "F16", "F32"])
def test_row_gather_is_fancy_indexing(src):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((48, 40)).astype(np.float32)
    stored = {"F32": x, "F16": x.astype(np.float16), "BF16": numpy_bf16(x)}[src]
    rows = rng.permutation(48)
    out, finite = convert(stored, src, "F32", rows)
    whole, _ = convert(stored, src, "F32")
    assert finite and np.array_equal(out, whole[rows])
    with pytest.raises(IndexError):
        convert(stored, src, "F32", np.array([0, 48]))


@pytest.mark.parametrize("ggml_type", [GGMLType.Q8_0, GGMLType.Q4_K])
def test_slab_wise_quantization_equals_quantizing_the_whole_tensor(ggml_type):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((37, 512)).astype(np.float32)
    bf16 = numpy_bf16(x)
    rows = rng.permutation(37)
    wide = (bf16.astype(np.uint32) << 16).view(np.float32)[rows]
    quantize = partial(kernels.quantize, ggml_type)
    want = kernels.quantize(ggml_type, wide)
    # slabs of 4 rows: ten slabs, the last one short
    data, finite = encode_stored(bf16, "BF16", ggml_type.name, rows, quantize, np.empty_like(want),
                                 slab_bytes=4 * 4 * 512)
    assert finite and np.array_equal(data, want)
    bf16[30, 7] = 0x7FC0  # a NaN in the last slab
    assert not encode_stored(bf16, "BF16", ggml_type.name, rows, quantize, np.empty_like(want),
                             slab_bytes=4 * 4 * 512)[1]
