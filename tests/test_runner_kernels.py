"""The runner's fused decode kernels (kernels/matvec.py) on their own: every weight type, rows whose block count
is not a multiple of the SIMD lane count (padding), several tokens at once, weights repacked into planes and back.

Reference: the weights dequantized by gguf-py (llama.cpp's Python package) times the activations as the integer
dot sees them (codes times scales), in float64. The kernels multiply the same integers, so only float32 rounding
differs — except Q4_1/Q5_1, where llama.cpp (and we) take each block's activation sum rounded to fp16."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType, dequantize

from qtool import kernels
from qtool.formats.constants import TYPE_INFO, GGMLType
from qtool.kernels import matmul as mm
from qtool.kernels import matvec as mv

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
FP16_SUMS = {"Q4_1", "Q5_1"}


@pytest.mark.parametrize("type_name", TYPES)
def test_fused_kernel_equals_dequantized_product(type_name):
    t = GGMLType[type_name]
    bs = TYPE_INFO[t].block_size
    rng = np.random.default_rng(7)
    n_out, n_in = 37, bs * 11  # 11 blocks: padded to 16 lanes
    w_f = (rng.standard_normal((n_out, n_in)) * rng.uniform(0.2, 3.0, (n_out, 1))).astype(np.float32)
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    packed = kernels.quantize(t, w_f).reshape(n_out, -1)
    w = mm.Weight("w", t, packed, n_out, n_in)
    assert w.planes.shape == (n_out, TYPE_INFO[t].type_size, mv.n_lanes(11))
    assert np.array_equal(w.stored_rows(5, 30), packed[5:30])

    act = mm.Act(mm.VEC_DOT_TYPE[t], x)
    out = mm.matvec(w, act)
    w_deq = dequantize(packed, GGMLQuantizationType(int(t))).reshape(n_out, n_in).astype(np.float64)
    ref = act.dequantized().astype(np.float64) @ w_deq.T
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert err < (1e-3 if type_name in FP16_SUMS else 1e-6), err
    # one token at a time gives the same numbers as three together
    single = np.concatenate([mm.matvec(w, mm.Act(mm.VEC_DOT_TYPE[t], x[i:i + 1])) for i in range(3)])
    assert np.array_equal(single, out)


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_fused_float_kernels(kind):
    rng = np.random.default_rng(3)
    w_f = rng.standard_normal((29, 200)).astype(np.float32)
    x = rng.standard_normal((2, 200)).astype(np.float32)
    if kind == "f16":
        t, bits = GGMLType.F16, w_f.astype(np.float16).view(np.uint16)
        w_seen = w_f.astype(np.float16).astype(np.float64)
    else:
        t, bits = GGMLType.BF16, (mm.round_bf16(w_f).view(np.uint32) >> 16).astype(np.uint16)
        w_seen = mm.round_bf16(w_f).astype(np.float64)
    act = mm.Act(kind, x)
    out = mm.matvec(mm.Weight("w", t, bits, 29, 200), act)
    ref = act.x.astype(np.float64) @ w_seen.T
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-6
