"""Q8_0 and the shared fp16 helpers, bit for bit against gguf-py (which matches llama.cpp's reference)."""
import numpy as np
import pytest
from numba import njit

from qtool import kernels
from qtool.formats.constants import GGMLType
from qtool.kernels.common import fp16_bits

gguf = pytest.importorskip("gguf", reason="needs gguf-py (the test extra)")

Q8 = gguf.GGMLQuantizationType.Q8_0


def edge_rows() -> np.ndarray:
    rows = np.zeros((8, 64), dtype=np.float32)
    rows[1] = -0.0
    rows[2, ::2] = -0.0
    rows[3] = np.float32(1e-42)  # subnormal
    rows[3, 1::3] = -np.float32(3e-45)
    rows[4] = 3.0e38  # near float32 max: d overflows fp16 to inf, as in llama.cpp
    rows[5, 7] = 1e6  # one huge outlier in a block of tiny values
    rows[5, :7] = 1e-3
    rows[6] = 0.5 * np.arange(64, dtype=np.float32) - 16.0  # exact halves: rounding ties
    rows[7] = 65504.0 * 127
    return rows


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_q8_0_equals_gguf_py_on_random_rows(scale):
    x = (np.random.default_rng(1).standard_normal((33, 256)) * scale).astype(np.float32)
    np.testing.assert_array_equal(kernels.quantize(GGMLType.Q8_0, x), gguf.quants.quantize(x, Q8))


def test_q8_0_equals_gguf_py_on_edge_cases():
    x = edge_rows()
    with np.errstate(all="ignore"):
        ref = gguf.quants.quantize(x, Q8)
    np.testing.assert_array_equal(kernels.quantize(GGMLType.Q8_0, x), ref)


def test_q8_0_dequantize_equals_gguf_py_and_error_is_within_half_a_step():
    x = (np.random.default_rng(2).standard_normal((16, 512)) * 2).astype(np.float32)
    q = kernels.quantize(GGMLType.Q8_0, x)
    dq = kernels.dequantize(GGMLType.Q8_0, q, 512)
    np.testing.assert_array_equal(dq, gguf.quants.dequantize(q, Q8))
    step = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True) / 127  # per-block scale d
    # half a step, plus the fp16 rounding of the scale (relative 2**-11) times the largest code, 127
    assert (np.abs(dq - x).reshape(-1, 32) <= step * (0.5 + 127 / 2048) + 1e-7).all()


def test_fp16_encoding_equals_numpy_for_every_half_and_random_floats():
    @njit
    def encode_all(a, out):
        for i in range(a.size):
            out[i] = fp16_bits(a[i])

    rng = np.random.default_rng(3)
    halves = np.arange(65536, dtype=np.uint16).view(np.float16)
    halves = halves[~np.isnan(halves)].astype(np.float32)
    rand = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-9, 6, 200_000)).astype(np.float32)
    a = np.concatenate([halves, rand, halves + np.float32(1e-9), np.float32([65519.99, 65520, 2.98e-8, 1e30])])
    out = np.zeros(a.size, np.int64)
    encode_all(a, out)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out, a.astype(np.float16).view(np.uint16))
